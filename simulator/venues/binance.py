"""Binance spot market streams and the REST history endpoints, as documented.

WebSocket: combined streams at ``/stream?streams=btcusdt@trade/btcusdt@bookTicker``
(``{"stream":..,"data":..}`` envelope), raw streams at ``/ws`` and ``/ws/<stream>``;
live ``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS``/``SET_PROPERTY``/``GET_PROPERTY``.
Only ``@trade``, ``@bookTicker`` and the diff depth streams ``@depth@100ms`` / ``@depth``
(both batched every 100 ms here) carry data; other stream names are accepted and stay
silent. Prices and sizes are printed with 8 decimals, as Binance does.

serverShutdown is the documented form: raw ``{"e":"serverShutdown","E":ms}``, combined
``{"stream":"!serverShutdown","data":{...}}``; the connection is closed (1001) after the
hub's grace period (the real venue waits minutes).

REST (GET only, on the same port): /api/v3/ping, time, trades, historicalTrades,
aggTrades (one aggregate per trade: a == f == l == trade id), klines, and depth (the
book's snapshot with ``lastUpdateId``, to start a local book from). Each response
carries ``X-MBX-USED-WEIGHT-1m``; the 6000/minute weight limit and the throttle fault
answer 429 with ``Retry-After`` and ``{"code":-1003,...}``. The REST history is the very
sequence the stream sends, so any gap on the stream is repairable from ``fromId``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from simulator.book import BookUpdate, OrderBook, book_of
from simulator.faults import TRADE, StreamFaults
from simulator.hub import Client, Key
from simulator.market import Bar, Market, QuoteRow, TradeRow
from simulator.venues import Items, VenueBase
from simulator.wire import fmt_rounded, fmt_units

NAME = "binance"
DP = 8  # Binance prints every spot price and size with 8 decimals
TRADE_FMT = '{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%s","q":"%s","T":%d,"m":%s,"M":true}'
BOOK_FMT = '{"u":%d,"s":"%s","b":"%s","B":"%s","a":"%s","A":"%s"}'
COMBINED_FMT = '{"stream":"%s","data":%s}'
# depth streams are their own hub keys, so the envelope names the stream subscribed
CHANNELS = {"trade": "trade", "bookTicker": "quote", "depth": "depth", "depth@100ms": "depth@100ms"}
DEPTH_STREAMS = ("depth@100ms", "depth")
DEPTH_FMT = '{"e":"depthUpdate","E":%d,"s":"%s","U":%d,"u":%d,"b":[%s],"a":[%s]}'
DEPTH_BATCH_MS = 100  # both depth streams are served at 100 ms (the venue's @depth: 1000)
STALE_MS = 3000  # the stale_snapshot fault answers with the book this much older
MAX_STREAMS = 1024


def venue_symbol(symbol: str) -> str:
    """BTC-USDT -> BTCUSDT"""
    return symbol.replace("-", "")


class _Fmt:
    """Per-symbol names and scale factors, computed once."""

    __slots__ = ("book_stream", "market", "pm", "qm", "sym", "trade_stream")

    def __init__(self, market: Market):
        self.market = market
        self.sym = venue_symbol(market.symbol)
        self.trade_stream = f"{self.sym.lower()}@trade"
        self.book_stream = f"{self.sym.lower()}@bookTicker"
        self.pm = 10 ** (DP - market.price_dp)
        self.qm = 10 ** (DP - market.qty_dp)

    def price(self, units: int) -> str:
        return fmt_units(units * self.pm, DP)

    def qty(self, units: int) -> str:
        return fmt_units(units * self.qm, DP)

    def trade(self, t: TradeRow, event_ms: int) -> str:
        return TRADE_FMT % (
            event_ms,
            self.sym,
            t.id,
            fmt_units(t.price * self.pm, DP),
            fmt_units(t.qty * self.qm, DP),
            t.ts_ms,
            "true" if t.buyer_maker else "false",
        )

    def levels(self, levels: list[tuple[int, int]]) -> list[list[str]]:
        return [[self.price(p), self.qty(q)] for p, q in levels]

    def level_text(self, levels) -> str:
        return ",".join('["%s","%s"]' % (self.price(p), self.qty(q)) for p, q in levels)

    def book(self, q: QuoteRow) -> str:
        return BOOK_FMT % (
            q.update_id,
            self.sym,
            fmt_units(q.bid * self.pm, DP),
            fmt_units(q.bid_qty * self.qm, DP),
            fmt_units(q.ask * self.pm, DP),
            fmt_units(q.ask_qty * self.qm, DP),
        )


def malformed_payload(kind: str, fmt: _Fmt, t: TradeRow, event_ms: int) -> str:
    """A broken trade payload: NaN price, a missing price field, or (with the envelope
    cut later) invalid JSON."""
    good = fmt.trade(t, event_ms)
    if kind == "nan_price":
        return good.replace(f'"p":"{fmt.price(t.price)}"', '"p":"NaN"', 1)
    if kind == "missing_field":
        return good.replace(f'"p":"{fmt.price(t.price)}",', "", 1)
    return good


class Binance(VenueBase):
    name = NAME

    def __init__(self, hub, markets, faults):
        super().__init__(hub, markets, faults)
        self.fmt = {sym: _Fmt(m) for sym, m in markets.items()}
        self._by_stream_symbol = {f.sym.lower(): sym for sym, f in self.fmt.items()}
        # per symbol, the depth batch being gathered: [first update id, start ms,
        # bid prices touched, ask prices touched]
        self._batch: dict[str, list] = {}

    def accepts(self, path: str) -> bool:
        return path in ("/stream", "/ws") or path.startswith("/ws/")

    # ---- connection ---------------------------------------------------------------------

    def open(self, c: Client, path: str, query: dict[str, str]) -> None:
        c.state["streams"] = []
        if path == "/stream":
            c.combined = True
            names = [s for s in query.get("streams", "").split("/") if s]
        else:
            c.combined = False
            names = [s for s in path[len("/ws/") :].split("/") if s] if path != "/ws" else []
        for name in names[:MAX_STREAMS]:
            self._subscribe(c, name)

    def _key(self, stream: str) -> Key | None:
        sym, _, kind = stream.partition("@")
        canonical = self._by_stream_symbol.get(sym)
        channel = CHANNELS.get(kind)
        if canonical is None or channel is None:
            return None
        return (channel, canonical)

    def _subscribe(self, c: Client, stream: str) -> None:
        streams: list[str] = c.state["streams"]
        if stream not in streams:
            streams.append(stream)
        key = self._key(stream)
        if key is not None:
            if key[0] in DEPTH_STREAMS:
                book_of(self.markets[key[1]])  # from now on the book moves with the market
            self.hub.subscribe(c, key)

    def _unsubscribe(self, c: Client, stream: str) -> None:
        streams: list[str] = c.state["streams"]
        if stream in streams:
            streams.remove(stream)
        key = self._key(stream)
        if key is not None:
            self.hub.unsubscribe(c, key)

    def receive(self, c: Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError as e:
            self.push(c, _ws_error(3, f"Invalid JSON: {e}", None))
            return
        if not isinstance(msg, dict):
            self.push(c, _ws_error(2, "Invalid request: expected a JSON object", None))
            return
        rid = msg.get("id")
        if "method" not in msg:
            self.push(c, _ws_error(2, "Invalid request: missing field `method`", rid))
            return
        if rid is not None and not isinstance(rid, int | str):
            self.push(
                c, _ws_error(2, "Invalid request: request ID must be an unsigned integer", None)
            )
            return
        method, params = msg.get("method"), msg.get("params") or []
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                self.push(c, _ws_error(2, "Invalid request: params must be a list of strings", rid))
                return
            if method == "SUBSCRIBE" and len(set(c.state["streams"]) | set(params)) > MAX_STREAMS:
                self.push(c, _ws_error(2, "Invalid request: too many streams", rid))
                return
            for stream in params:
                (self._subscribe if method == "SUBSCRIBE" else self._unsubscribe)(c, stream)
            self.push(c, _ws_result(None, rid))
        elif method == "LIST_SUBSCRIPTIONS":
            self.push(c, _ws_result(list(c.state["streams"]), rid))
        elif method in ("SET_PROPERTY", "GET_PROPERTY"):
            if not params or params[0] != "combined":
                self.push(c, _ws_error(0, "Unknown property", rid))
            elif method == "GET_PROPERTY":
                self.push(c, _ws_result(c.combined, rid))
            elif len(params) != 2 or not isinstance(params[1], bool):
                self.push(c, _ws_error(1, "Invalid value type: expected Boolean", rid))
            else:
                c.combined = params[1]
                self.push(c, _ws_result(None, rid))
        else:
            self.push(
                c,
                _ws_error(
                    2,
                    f"Invalid request: unknown variant {method!r}, expected one of `SUBSCRIBE`, "
                    "`UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`",
                    rid,
                ),
            )

    def shutdown_frame(self, c: Client) -> str | None:
        payload = '{"e":"serverShutdown","E":%d}' % (time.time_ns() // 1_000_000)
        return COMBINED_FMT % ("!serverShutdown", payload) if c.combined else payload

    # ---- streaming ----------------------------------------------------------------------

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        fmt = self.fmt[symbol]
        if items:
            self._send(("trade", symbol), fmt.trade_stream, items, fmt, now_ms)
        if quotes:
            group = self.hub.subscribers(self.name, ("quote", symbol))
            if group:
                led = self.faults.ledger(symbol)
                for q in quotes:
                    payload = fmt.book(q)
                    wrapped = COMBINED_FMT % (fmt.book_stream, payload)
                    for c in tuple(group):
                        self.hub.push(c, wrapped if c.combined else payload)
                led.quotes_sent += len(quotes)

    def publish_book(
        self, symbol: str, book: OrderBook, updates: list[BookUpdate], now_ms: int
    ) -> None:
        """Gather the symbol's book updates and send them as one depthUpdate per
        ``DEPTH_BATCH_MS``: ``U``..``u`` the update ids covered, each touched level with
        its quantity now (0 deletes). A client that subscribes mid-batch gets the whole
        batch, as Binance's own buffering rule expects."""
        subs = self.hub.subs[self.name]
        groups = [(s, subs.get((s, symbol))) for s in DEPTH_STREAMS]
        if not any(g for _, g in groups):
            self._batch.pop(symbol, None)
            return
        batch = self._batch.get(symbol)
        if updates:
            if batch is None:
                batch = self._batch[symbol] = [updates[0].update_id, now_ms, set(), set()]
            for up in updates:
                batch[2].update(p for p, _ in up.bids)
                batch[3].update(p for p, _ in up.asks)
        if batch is None or now_ms - batch[1] < DEPTH_BATCH_MS:
            return
        del self._batch[symbol]
        if self.faults.take(symbol, "book_gap"):
            return  # the frame is never sent: the next one's U jumps
        fmt = self.fmt[symbol]
        bq, aq = book.bids.qty, book.asks.qty
        payload = DEPTH_FMT % (
            book.event_ms,
            fmt.sym,
            batch[0],
            book.update_id,
            fmt.level_text((p, bq.get(p, 0)) for p in sorted(batch[2], reverse=True)),
            fmt.level_text((p, aq.get(p, 0)) for p in sorted(batch[3])),
        )
        for stream, group in groups:
            if group:
                wrapped = COMBINED_FMT % (f"{fmt.sym.lower()}@{stream}", payload)
                for c in tuple(group):
                    self.hub.push(c, wrapped if c.combined else payload)
        self.faults.ledger(symbol).book_frames += 1

    def _send(self, key: Key, stream: str, items: Items, fmt: _Fmt, now_ms: int) -> None:
        group = self.hub.subscribers(self.name, key)
        push = self.hub.push
        for kind, t in items:
            if kind is TRADE:
                payload = fmt.trade(t, now_ms)
                wrapped = COMBINED_FMT % (stream, payload)
                for c in tuple(group):
                    push(c, wrapped if c.combined else payload)
                continue
            payload = malformed_payload(kind, fmt, t, now_ms)
            wrapped = COMBINED_FMT % (stream, payload)
            if kind == "invalid_json":
                payload, wrapped = payload[: len(payload) // 2], wrapped[: len(wrapped) // 2]
            texts: dict[str, None] = {}
            for c in tuple(group):
                frame = wrapped if c.combined else payload
                texts[frame] = None
                push(c, frame)
            self.faults.ledger(fmt.market.symbol).note_malformed(
                kind, t.id, list(texts), len(group)
            )


def _ws_result(result: Any, rid: Any) -> str:
    return json.dumps({"result": result, "id": rid}, separators=(",", ":"))


def _ws_error(code: int, msg: str, rid: Any) -> str:
    return json.dumps({"error": {"code": code, "msg": msg}, "id": rid}, separators=(",", ":"))


# ---- REST ---------------------------------------------------------------------------------

INTERVALS_MS = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
}
WEIGHT_LIMIT_1M = 6000
ENDPOINTS = ("ping", "time", "trades", "historicalTrades", "aggTrades", "klines", "depth")


class ApiError(Exception):
    def __init__(self, status: int, code: int, msg: str):
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg


class BinanceRest:
    """``/api/v3`` history endpoints over the shared markets, with Binance's weights."""

    def __init__(
        self,
        markets: dict[str, Market],
        weight_limit: int = WEIGHT_LIMIT_1M,
        faults: StreamFaults | None = None,
    ):
        self.faults = faults or StreamFaults(NAME)  # the stream's: stale_snapshot is one
        self.markets = {venue_symbol(s): m for s, m in markets.items()}
        self.fmt = {venue_symbol(s): _Fmt(m) for s, m in markets.items()}
        self.weight_limit = weight_limit
        self.throttle_left = 0  # fault: the next K requests get 429
        self.retry_after_s = 1
        self.requests = 0
        self.throttled = 0
        self.rate_limited = 0
        self._minute = 0
        self._weight = 0

    def handle(self, path: str, params: dict[str, str], now_ms: int) -> tuple[int, Any, dict]:
        """-> (HTTP status, JSON-able body, extra headers)."""
        self.requests += 1
        endpoint = path[len("/api/v3/") :]
        minute = now_ms // 60_000
        if minute != self._minute:
            self._minute, self._weight = minute, 0
        headers = {"X-MBX-USED-WEIGHT-1m": str(self._weight)}
        if self.throttle_left > 0:
            self.throttle_left -= 1
            self.throttled += 1
            headers["Retry-After"] = str(self.retry_after_s)
            return 429, _too_many(self.weight_limit), headers
        if endpoint not in ENDPOINTS:
            return 404, {"code": -1, "msg": f"Unknown endpoint {path}"}, headers
        weight = _weight(endpoint, params)
        if self._weight + weight > self.weight_limit:
            self.rate_limited += 1
            headers["Retry-After"] = str(max(1, 60 - (now_ms // 1000) % 60))
            return 429, _too_many(self.weight_limit), headers
        self._weight += weight
        headers["X-MBX-USED-WEIGHT-1m"] = str(self._weight)
        try:
            return 200, getattr(self, "_" + endpoint)(params, now_ms), headers
        except ApiError as e:
            return e.status, {"code": e.code, "msg": e.msg}, headers

    # each handler returns the JSON body

    def _ping(self, params, now_ms):
        return {}

    def _time(self, params, now_ms):
        return {"serverTime": now_ms}

    def _market(self, params) -> tuple[Market, _Fmt]:
        sym = params.get("symbol")
        if not sym:
            raise ApiError(
                400,
                -1102,
                "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
            )
        m = self.markets.get(sym)
        if m is None:
            raise ApiError(400, -1121, "Invalid symbol.")
        return m, self.fmt[sym]

    def _trades(self, params, now_ms):
        m, fmt = self._market(params)
        return [_trade_json(fmt, t) for t in m.recent(_limit(params, 500, 1000))]

    def _historicalTrades(self, params, now_ms):
        m, fmt = self._market(params)
        limit = _limit(params, 500, 1000)
        from_id = _int(params, "fromId")
        rows = m.recent(limit) if from_id is None else m.from_id(from_id, limit)
        return [_trade_json(fmt, t) for t in rows]

    def _aggTrades(self, params, now_ms):
        m, fmt = self._market(params)
        limit = _limit(params, 500, 1000)
        from_id = _int(params, "fromId")
        start, end = _int(params, "startTime"), _int(params, "endTime")
        if start is not None and end is not None and end - start > 3_600_000:
            raise ApiError(400, -1127, "More than 1 hours between startTime and endTime.")
        if from_id is not None:
            rows = m.from_id(from_id, limit)
        elif start is not None or end is not None:
            lo = m.index_at(start) if start is not None else 0
            if end is not None and start is None:
                lo = max(0, m.index_at(end + 1) - limit)
            rows = m.rows(lo, lo + limit)
        else:
            rows = m.recent(limit)
        if end is not None:
            rows = [t for t in rows if t.ts_ms <= end]
        return [
            {
                "a": t.id,
                "p": fmt.price(t.price),
                "q": fmt.qty(t.qty),
                "f": t.id,
                "l": t.id,
                "T": t.ts_ms,
                "m": t.buyer_maker,
                "M": True,
            }
            for t in rows
        ]

    def _klines(self, params, now_ms):
        m, fmt = self._market(params)
        interval = params.get("interval")
        if not interval:
            raise ApiError(
                400,
                -1102,
                "Mandatory parameter 'interval' was not sent, was empty/null, or malformed.",
            )
        width = INTERVALS_MS.get(interval)
        if width is None:
            raise ApiError(400, -1120, "Invalid interval.")
        limit = _limit(params, 500, 1000)
        start, end = _int(params, "startTime"), _int(params, "endTime")
        if start is None:
            start = ((end if end is not None else now_ms) // width - (limit - 1)) * width
        if end is None:
            end = now_ms
        return [_kline_json(m, fmt, b, width) for b in m.bars(width, start, end, limit)]

    def _depth(self, params, now_ms):
        """The book's best ``limit`` levels a side (default 100, at most 5000) and the id
        of the last update it holds. The stale_snapshot fault answers once with the book
        of ``STALE_MS`` earlier (or the oldest it can rebuild)."""
        m, fmt = self._market(params)
        limit = _limit(params, 100, 5000)
        book = book_of(m)
        led = self.faults.ledger(m.symbol)
        led.book_snapshots += 1
        if self.faults.take(m.symbol, "stale_snapshot"):
            try:
                old = book.at(now_ms - STALE_MS, limit)
            except ValueError:
                old = book.at(book.base_ms, limit)
            bids, asks, last = old.bids, old.asks, old.update_id
        else:
            (bids, asks), last = book.top(limit), book.update_id
        return {"lastUpdateId": last, "bids": fmt.levels(bids), "asks": fmt.levels(asks)}


def _weight(endpoint: str, params: dict[str, str]) -> int:
    if endpoint in ("trades", "historicalTrades"):
        return 25
    if endpoint == "depth":
        try:
            limit = int(params.get("limit", 100))
        except ValueError:
            return 5
        return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
    if endpoint == "aggTrades":
        return 4
    if endpoint == "klines":
        try:
            limit = int(params.get("limit", 500))
        except ValueError:
            return 2
        return 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10
    return 1


def _too_many(limit: int) -> dict:
    return {
        "code": -1003,
        "msg": f"Too much request weight used; current limit is {limit} request weight "
        "per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
    }


def _int(params: dict[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 20:
        raise ApiError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(raw)


def _limit(params: dict[str, str], default: int, maximum: int) -> int:
    n = _int(params, "limit")
    if n is None:
        return default
    return max(1, min(n, maximum))


def _trade_json(fmt: _Fmt, t: TradeRow) -> dict[str, Any]:
    m = fmt.market
    return {
        "id": t.id,
        "price": fmt.price(t.price),
        "qty": fmt.qty(t.qty),
        "quoteQty": fmt_rounded(t.price * t.qty, m.price_dp + m.qty_dp, DP),
        "time": t.ts_ms,
        "isBuyerMaker": t.buyer_maker,
        "isBestMatch": True,
    }


def _kline_json(m: Market, fmt: _Fmt, b: Bar, width: int) -> list:
    qdp = m.price_dp + m.qty_dp
    return [
        b.open_ms,
        fmt.price(b.open),
        fmt.price(b.high),
        fmt.price(b.low),
        fmt.price(b.close),
        fmt.qty(b.volume),
        b.open_ms + width - 1,
        fmt_rounded(b.quote_volume, qdp, DP),
        b.count,
        fmt.qty(b.taker_buy_volume),
        fmt_rounded(b.taker_buy_quote, qdp, DP),
        "0",
    ]
