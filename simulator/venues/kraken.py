"""Kraken spot WebSocket v2, at ``/kraken`` (also ``/kraken/v2``).

On connect a ``status`` update (system ``online``). Subscribe with
``{"method":"subscribe","params":{"channel":"trade","symbol":["BTC/USD"],"snapshot":false},
"req_id":1}``; one ack per symbol ``{"method":"subscribe","result":{"channel","snapshot",
"symbol"},"success":true,"time_in","time_out","req_id"}``; unknown pairs get
``success:false`` with an ``error``. ``ping`` is answered with ``pong``.

- trade: optional ``snapshot`` (the last 50 trades, default off), then ``update``
  messages batching each tick's trades: ``{"symbol","side","price","qty","ord_type",
  "trade_id","timestamp"}``; ``side`` is the taker's side; ``price``/``qty`` are JSON
  numbers written with the instrument's exact decimals (parse them with Decimal).
- ticker: snapshot on subscribe (default on), then an update per tick with changes.
- book (``depth`` 10, 25, 100, 500 or 1000; default 10): a snapshot of the top ``depth``
  levels a side with ``checksum`` on every subscribe (a resubscription is how a client
  resyncs), then per tick an ``update`` with ``timestamp`` (the book update's event time)
  listing each changed level of the top-``depth`` view; the client truncates to
  ``depth`` and checks the CRC32 ``checksum`` (see ``checksum``) after each message.
- heartbeat: ``{"channel":"heartbeat"}`` every second once anything is subscribed.
The shutdown fault sends a ``status`` update with system ``maintenance`` and then closes.
Symbols are the canonical ones with ``/``: BTC-USDT -> BTC/USDT.
"""

from __future__ import annotations

import json
import time
import zlib

from simulator.book import BookUpdate, OrderBook, book_of
from simulator.faults import TRADE
from simulator.hub import Client
from simulator.market import Market, QuoteRow, TradeRow
from simulator.venues import Items, VenueBase
from simulator.wire import fmt_units, rfc3339_ms

NAME = "kraken"
API_VERSION = "2.0.10"
TRADE_FMT = (
    '{"symbol":"%s","side":"%s","price":%s,"qty":%s,"ord_type":"market",'
    '"trade_id":%d,"timestamp":"%s"}'
)
CHANNELS = {"trade": "trade", "ticker": "quote", "book": "book"}
SNAPSHOT_TRADES = 50
BOOK_DEPTHS = (10, 25, 100, 500, 1000)
CHECKSUM_LEVELS = 10
LEVEL_FMT = '{"price":%s,"qty":%s}'


def venue_symbol(symbol: str) -> str:
    """BTC-USDT -> BTC/USDT"""
    return symbol.replace("-", "/")


def _trade(m: Market, t: TradeRow) -> str:
    return TRADE_FMT % (
        venue_symbol(m.symbol),
        "sell" if t.buyer_maker else "buy",
        fmt_units(t.price, m.price_dp),
        fmt_units(t.qty, m.qty_dp),
        t.id,
        rfc3339_ms(t.ts_ms),
    )


def _malformed(kind: str, m: Market, t: TradeRow) -> str:
    good = _trade(m, t)
    price = f'"price":{fmt_units(t.price, m.price_dp)}'
    if kind == "nan_price":
        return good.replace(price, '"price":NaN', 1)
    if kind == "missing_field":
        return good.replace(price + ",", "", 1)
    return good


def _ticker(m: Market, q: QuoteRow) -> str:
    pdp, qdp = m.price_dp, m.qty_dp
    # quote units (10**-(pdp+qdp)) over qty units (10**-qdp) leave price units (10**-pdp)
    vwap = m.quote_volume // m.volume if m.volume else m.last_price
    change = m.last_price - m.open_price
    pct = change * 100 / m.open_price if m.open_price else 0.0
    return (
        '{"symbol":"%s","bid":%s,"bid_qty":%s,"ask":%s,"ask_qty":%s,"last":%s,"volume":%s,'
        '"vwap":%s,"low":%s,"high":%s,"change":%s,"change_pct":%.2f,"timestamp":"%s"}'
        % (
            venue_symbol(m.symbol),
            fmt_units(q.bid, pdp),
            fmt_units(q.bid_qty, qdp),
            fmt_units(q.ask, pdp),
            fmt_units(q.ask_qty, qdp),
            fmt_units(m.last_price, pdp),
            fmt_units(m.volume, qdp),
            fmt_units(vwap, pdp),
            fmt_units(m.low, pdp),
            fmt_units(m.high, pdp),
            fmt_units(change, pdp),
            pct,
            rfc3339_ms(q.ts_ms),
        )
    )


def _digits(text: str) -> str:
    return text.replace(".", "").lstrip("0")


def checksum(m: Market, bids: list[tuple[int, int]], asks: list[tuple[int, int]]) -> int:
    """Kraken's v2 book checksum of a book (already truncated to the subscribed depth):
    CRC32 of the top 10 asks low to high then the top 10 bids high to low, each price
    and quantity as printed on the wire with '.' removed and leading zeros stripped."""
    pdp, qdp = m.price_dp, m.qty_dp
    text = "".join(
        _digits(fmt_units(p, pdp)) + _digits(fmt_units(q, qdp))
        for p, q in (*asks[:CHECKSUM_LEVELS], *bids[:CHECKSUM_LEVELS])
    )
    return zlib.crc32(text.encode("ascii"))


def _levels(m: Market, levels) -> str:
    pdp, qdp = m.price_dp, m.qty_dp
    return ",".join(
        LEVEL_FMT % (fmt_units(p, pdp), fmt_units(q, qdp) if q else "0") for p, q in levels
    )


def _book_entry(m: Market, bids, asks, check: int, ts_ms: int | None) -> str:
    stamp = "" if ts_ms is None else ',"timestamp":"%s"' % rfc3339_ms(ts_ms)
    return '{"symbol":"%s","bids":[%s],"asks":[%s],"checksum":%d%s}' % (
        venue_symbol(m.symbol),
        _levels(m, bids),
        _levels(m, asks),
        check,
        stamp,
    )


def _now_iso() -> str:
    return rfc3339_ms(time.time_ns() // 1_000_000)


class Kraken(VenueBase):
    name = NAME

    def __init__(self, hub, markets, faults):
        super().__init__(hub, markets, faults)
        self._by_pair = {venue_symbol(s): s for s in markets}
        # (symbol, depth) -> the top-depth (bids, asks) its subscribers were last shown
        self._views: dict[tuple[str, int], tuple[dict[int, int], dict[int, int]]] = {}

    def accepts(self, path: str) -> bool:
        return path in ("/kraken", "/kraken/v2")

    def open(self, c: Client, path: str, query: dict[str, str]) -> None:
        c.state["heartbeat"] = False
        self.push(c, self._status(c, "online"))

    def _status(self, c: Client, system: str) -> str:
        data = {
            "version": API_VERSION,
            "system": system,
            "api_version": "v2",
            "connection_id": c.id,
        }
        return json.dumps(
            {"channel": "status", "type": "update", "data": [data]}, separators=(",", ":")
        )

    def shutdown_frame(self, c: Client) -> str | None:
        return self._status(c, "maintenance")

    def receive(self, c: Client, text: str) -> None:
        time_in = _now_iso()
        try:
            msg = json.loads(text)
        except ValueError:
            self._reply(c, {"error": "Malformed request", "success": False}, time_in)
            return
        if not isinstance(msg, dict):
            self._reply(c, {"error": "Malformed request", "success": False}, time_in)
            return
        method = msg.get("method")
        base = {"method": method}
        if "req_id" in msg:
            base["req_id"] = msg["req_id"]
        if method == "ping":
            self._reply(c, base | {"method": "pong"}, time_in)
            return
        if method not in ("subscribe", "unsubscribe"):
            self._reply(
                c, base | {"error": f"Method not found: {method}", "success": False}, time_in
            )
            return
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        channel = params.get("channel")
        if channel == "heartbeat":
            c.state["heartbeat"] = method == "subscribe"
            self._reply(c, base | {"result": {"channel": channel}, "success": True}, time_in)
            return
        if channel not in CHANNELS:
            self._reply(
                c, base | {"error": f"Channel {channel} not found", "success": False}, time_in
            )
            return
        pairs = params.get("symbol")
        if not isinstance(pairs, list) or not pairs:
            self._reply(c, base | {"error": "Missing symbol", "success": False}, time_in)
            return
        snapshot = bool(params.get("snapshot", channel != "trade"))
        depth = params.get("depth", 10)
        if channel == "book" and depth not in BOOK_DEPTHS:
            err = f"Invalid depth {depth}: one of {', '.join(map(str, BOOK_DEPTHS))}"
            self._reply(c, base | {"error": err, "success": False}, time_in)
            return
        for pair in pairs:
            sym = self._by_pair.get(pair) if isinstance(pair, str) else None
            if sym is None:
                err = f"Currency pair not supported {pair}"
                self._reply(c, base | {"error": err, "success": False, "symbol": pair}, time_in)
                continue
            key = (CHANNELS[channel], sym)
            result = {"channel": channel, "symbol": pair}
            if channel == "book":
                result["depth"] = depth
            if method == "unsubscribe":
                self.hub.unsubscribe(c, key)
                c.state.get("book_depth", {}).pop(sym, None)
                self._reply(c, base | {"result": result, "success": True}, time_in)
                continue
            result["snapshot"] = snapshot
            self._reply(c, base | {"result": result, "success": True}, time_in)
            if channel == "book":
                # a (re)subscription always starts from a snapshot: it is how the client
                # resyncs, and its updates make sense only on top of one
                c.state.setdefault("book_depth", {})[sym] = depth
                self._book_snapshot(c, sym, depth)
            elif snapshot:
                self._snapshot(c, channel, sym)
            self.hub.subscribe(c, key)
            c.state["heartbeat"] = True

    def _reply(self, c: Client, body: dict, time_in: str) -> None:
        body = body | {"time_in": time_in, "time_out": _now_iso()}
        self.push(c, json.dumps(body, separators=(",", ":")))

    def _snapshot(self, c: Client, channel: str, sym: str) -> None:
        m = self.markets[sym]
        if channel == "trade":
            rows = m.recent(SNAPSHOT_TRADES)
            data = ",".join(_trade(m, t) for t in rows)
            self.faults.ledger(sym).snapshot_trades += len(rows)
        else:
            data = _ticker(m, m.quote(time.time_ns() // 1_000_000))
        self.push(c, '{"channel":"%s","type":"snapshot","data":[%s]}' % (channel, data))

    def _book_snapshot(self, c: Client, sym: str, depth: int) -> None:
        m = self.markets[sym]
        book = book_of(m)
        view = self._views.get((sym, depth))
        if view is None:
            bids, asks = book.top(depth)
            view = self._views[(sym, depth)] = (dict(bids), dict(asks))
        # the view is the book's top now: books move only in the pacing loop, which
        # refreshes every view it keeps (see publish_book)
        bids, asks = _sorted(view)
        entry = _book_entry(m, bids, asks, checksum(m, bids, asks), None)
        self.push(c, '{"channel":"book","type":"snapshot","data":[%s]}' % entry)
        self.faults.ledger(sym).book_snapshots += 1

    def publish_book(
        self, symbol: str, book: OrderBook, updates: list[BookUpdate], now_ms: int
    ) -> None:
        """One update per tick and subscribed depth: every level of the top-``depth``
        view that changed, a level that entered it included, and a deletion (qty 0) for
        a level gone from the book; a level only pushed below the depth is not sent (the
        client truncates, as Kraken documents), so the checksum is over the truncated
        book."""
        if not updates:
            return
        group = self.hub.subs[self.name].get(("book", symbol))
        by_depth: dict[int, list[Client]] = {}
        for c in group or ():
            by_depth.setdefault(c.state["book_depth"][symbol], []).append(c)
        for key in [k for k in self._views if k[0] == symbol and k[1] not in by_depth]:
            del self._views[key]  # nobody to keep it for; a new subscriber starts afresh
        if not by_depth:
            return
        m = self.markets[symbol]
        frames: list[tuple[list[Client], tuple[list, list], int]] = []
        for depth, clients in by_depth.items():
            old_b, old_a = self._views[(symbol, depth)]
            bids, asks = book.top(depth)
            new_b, new_a = dict(bids), dict(asks)
            changed_b = _changes(old_b, new_b, book.bids.qty)
            changed_a = _changes(old_a, new_a, book.asks.qty)
            self._views[(symbol, depth)] = (new_b, new_a)
            if changed_b or changed_a:
                check = checksum(m, bids, asks)
                frames.append((clients, (changed_b, changed_a), check))
        if not frames:
            return
        if self.faults.take(symbol, "book_gap"):
            return  # never sent: the client's checksum fails on the next one
        wrong = self.faults.take(symbol, "book_checksum")
        for clients, (changed_b, changed_a), check in frames:
            if wrong:
                check = (check + 1) % 2**32
            entry = _book_entry(m, changed_b, changed_a, check, book.event_ms)
            frame = '{"channel":"book","type":"update","data":[%s]}' % entry
            for c in clients:
                self.hub.push(c, frame)
        self.faults.ledger(symbol).book_frames += 1

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        m = self.markets[symbol]
        led = self.faults.ledger(symbol)
        hub = self.hub
        if items:
            group = tuple(hub.subscribers(self.name, ("trade", symbol)))
            trades = []
            for kind, t in items:
                if kind is TRADE:
                    trades.append(_trade(m, t))
                    continue
                frame = '{"channel":"trade","type":"update","data":[%s]}' % _malformed(kind, m, t)
                if kind == "invalid_json":
                    frame = frame[: len(frame) // 2]
                for c in group:
                    hub.push(c, frame)
                led.note_malformed(kind, t.id, [frame], len(group))
            if trades:
                frame = '{"channel":"trade","type":"update","data":[%s]}' % ",".join(trades)
                for c in group:
                    hub.push(c, frame)
        if items or quotes:
            group = tuple(hub.subscribers(self.name, ("quote", symbol)))
            if group:
                data = _ticker(m, m.quote(now_ms))
                frame = '{"channel":"ticker","type":"update","data":[%s]}' % data
                for c in group:
                    hub.push(c, frame)
                led.quotes_sent += 1

    def heartbeat(self, now_ms: int) -> None:
        for c in tuple(self.hub.clients[self.name]):
            if c.state.get("heartbeat"):
                self.push(c, '{"channel":"heartbeat"}')


def _sorted(view: tuple[dict[int, int], dict[int, int]]) -> tuple[list, list]:
    bids, asks = view
    return sorted(bids.items(), reverse=True), sorted(asks.items())


def _changes(old: dict[int, int], new: dict[int, int], book: dict[int, int]) -> list:
    """Levels of ``new`` that ``old`` lacks or shows another size of, and levels of
    ``old`` gone from the book itself (qty 0)."""
    out = [(p, q) for p, q in new.items() if old.get(p) != q]
    out += [(p, 0) for p in old if p not in new and p not in book]
    return out


# ---- REST ---------------------------------------------------------------------------------

LEGACY = {"BTC": "XBT", "DOGE": "XDG"}  # Kraken REST still names these the old way
PAGE = 1000


def rest_pair(symbol: str) -> str:
    """BTC-USDT -> XBTUSDT"""
    base, _, quote = symbol.partition("-")
    return LEGACY.get(base, base) + LEGACY.get(quote, quote)


class KrakenRest:
    """``GET /0/public/Trades?pair=XBTUSDT&since=<ns>&count=``: up to 1000 trades strictly
    after ``since`` (epoch nanoseconds), oldest first, as [price, volume, time, b/s, m/l,
    misc, trade_id] rows, with ``last`` (the cursor for the next call). A full page ends
    before the last millisecond it would split, so paging by ``last`` loses nothing."""

    def __init__(self, markets: dict[str, Market]):
        self.by_pair = {rest_pair(s): m for s, m in markets.items()}
        self.requests = 0

    def handles(self, path: str) -> bool:
        return path == "/0/public/Trades"

    def handle(self, path: str, params: dict[str, str], now_ms: int) -> tuple[int, dict]:
        self.requests += 1
        m = self.by_pair.get(params.get("pair", ""))
        if m is None:
            return 200, {"error": ["EQuery:Unknown asset pair"]}
        try:
            since_ns = int(params.get("since") or 0)
            count = min(PAGE, int(params.get("count") or PAGE))
        except ValueError:
            return 200, {"error": ["EGeneral:Invalid arguments"]}
        # strictly after `since`: the first trade whose millisecond is past since's
        lo = m.index_at(since_ns // 1_000_000 + 1)
        rows = m.rows(lo, lo + count + 1)
        if len(rows) > count:  # do not split a millisecond across pages
            cut = rows[count].ts_ms
            rows = [t for t in rows[:count] if t.ts_ms < cut] or rows[:count]
        last = rows[-1].ts_ms * 1_000_000 if rows else since_ns
        body = [
            [
                fmt_units(t.price, m.price_dp),
                fmt_units(t.qty, m.qty_dp),
                t.ts_ms / 1000,  # seconds; a float's shortest repr is exact to the ms
                "s" if t.buyer_maker else "b",
                "m",
                "",
                t.id,
            ]
            for t in rows
        ]
        return 200, {"error": [], "result": {rest_pair(m.symbol): body, "last": str(last)}}
