"""Deribit JSON-RPC 2.0 over WebSocket (API v2), at ``/deribit``.

Requests ``{"jsonrpc":"2.0","id":N,"method":...,"params":{...}}`` get
``{"jsonrpc":"2.0","id":N,"result":...}`` or ``{"jsonrpc":"2.0","id":N,"error":{"code",
"message"}}``:

- ``public/subscribe`` / ``public/unsubscribe`` with ``channels``: ``trades.<instrument>.
  <raw|100ms|agg2>`` and ``quote.<instrument>``; the result lists the channels taken, and,
  as on Deribit, an unknown channel is silently left out;
- ``public/set_heartbeat`` with ``interval`` (>= 10 s): every interval a
  ``{"method":"heartbeat","params":{"type":"test_request"}}`` notification; a client that
  has not answered the previous one with ``public/test`` is disconnected;
- ``public/test``: ``{"version": ...}``.

Notifications: ``{"jsonrpc":"2.0","method":"subscription","params":{"channel","data"}}``;
trades batch each tick's trades with ``trade_seq`` = the market's trade id (contiguous per
instrument, what REST serves by sequence), prices and amounts as JSON numbers; quotes
carry best bid/ask. Deribit has no shutdown notice: the shutdown fault only closes.
Instruments are spelled from the canonical symbols as Deribit spells them: BTC-USDPERP ->
BTC-PERPETUAL, ETH-USDCPERP -> ETH_USDC-PERPETUAL, anything else spot: BTC-USDT -> BTC_USDT.
"""

from __future__ import annotations

import json
from typing import Any

from simulator.faults import TRADE
from simulator.hub import Client
from simulator.market import Market, QuoteRow, TradeRow
from simulator.venues import Items, VenueBase
from simulator.wire import fmt_units

NAME = "deribit"
VERSION = "1.2.26"
INTERVALS = ("raw", "100ms", "agg2")
MIN_HEARTBEAT_S = 10
TRADE_FMT = (
    '{"trade_seq":%d,"trade_id":"%d","timestamp":%d,"tick_direction":%d,"price":%s,'
    '"mark_price":%s,"instrument_name":"%s","index_price":%s,"direction":"%s","amount":%s}'
)
NOTIFY = '{"jsonrpc":"2.0","method":"subscription","params":{"channel":"%s","data":%s}}'
TEST_REQUEST = '{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}'


def venue_symbol(symbol: str) -> str:
    """BTC-USDPERP -> BTC-PERPETUAL, ETH-USDCPERP -> ETH_USDC-PERPETUAL, BTC-USDT -> BTC_USDT"""
    base, _, quote = symbol.partition("-")
    if quote.endswith("PERP") and len(quote) > 4:
        quote = quote[:-4]
        return f"{base}-PERPETUAL" if quote == "USD" else f"{base}_{quote}-PERPETUAL"
    return f"{base}_{quote}"


def _trade(m: Market, t: TradeRow) -> str:
    price = fmt_units(t.price, m.price_dp)
    return TRADE_FMT % (
        t.id, t.id, t.ts_ms, 0 if t.buyer_maker else 1, price, price,
        venue_symbol(m.symbol), price, "sell" if t.buyer_maker else "buy",
        fmt_units(t.qty, m.qty_dp),
    )  # fmt: skip


def _malformed(kind: str, m: Market, t: TradeRow) -> str:
    good = _trade(m, t)
    price = f'"price":{fmt_units(t.price, m.price_dp)},'
    if kind == "nan_price":
        return good.replace(price, '"price":NaN,', 1)
    if kind == "missing_field":
        return good.replace(price, "", 1)
    return good


def _quote(m: Market, q: QuoteRow) -> str:
    pdp, qdp = m.price_dp, m.qty_dp
    return (
        '{"timestamp":%d,"instrument_name":"%s","best_bid_price":%s,"best_bid_amount":%s,'
        '"best_ask_price":%s,"best_ask_amount":%s}'
        % (
            q.ts_ms, venue_symbol(m.symbol), fmt_units(q.bid, pdp), fmt_units(q.bid_qty, qdp),
            fmt_units(q.ask, pdp), fmt_units(q.ask_qty, qdp),
        )
    )  # fmt: skip


def _answer(c_id: Any, **body: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": c_id, **body}, separators=(",", ":"))


class Deribit(VenueBase):
    name = NAME

    def __init__(self, hub, markets, faults):
        super().__init__(hub, markets, faults)
        self._by_name = {venue_symbol(s): s for s in markets}

    def accepts(self, path: str) -> bool:
        return path in ("/deribit", "/deribit/ws/api/v2")

    def open(self, c: Client, path: str, query: dict[str, str]) -> None:
        c.state["channels"] = {}  # hub key -> the channel name the client asked for

    def receive(self, c: Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.push(c, _answer(None, error={"code": -32700, "message": "Parse error"}))
            return
        if not isinstance(msg, dict):
            self.push(c, _answer(None, error={"code": -32600, "message": "Invalid Request"}))
            return
        rid, method = msg.get("id"), msg.get("method")
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        if method == "public/test":
            c.state["test_pending"] = False
            self.push(c, _answer(rid, result={"version": VERSION}))
        elif method == "public/set_heartbeat":
            interval = params.get("interval")
            if not isinstance(interval, int) or interval < MIN_HEARTBEAT_S:
                err = {"code": 11029, "message": "invalid_arguments", "data": "interval"}
                self.push(c, _answer(rid, error=err))
                return
            c.state.update(heartbeat_ms=interval * 1000, next_beat_ms=0, test_pending=False)
            self.push(c, _answer(rid, result="ok"))
        elif method in ("public/subscribe", "public/unsubscribe"):
            channels = params.get("channels")
            if not isinstance(channels, list):
                err = {"code": -32602, "message": "Invalid params", "data": "channels"}
                self.push(c, _answer(rid, error=err))
                return
            taken = [ch for ch in channels if self._key(ch) is not None]
            self.push(c, _answer(rid, result=taken))
            for ch in taken:
                key = self._key(ch)
                if method == "public/unsubscribe":
                    self.hub.unsubscribe(c, key)
                    c.state["channels"].pop(key, None)
                else:
                    c.state["channels"][key] = ch
                    self.hub.subscribe(c, key)
        else:
            err = {"code": -32601, "message": "Method not found"}
            self.push(c, _answer(rid, error=err))

    def _key(self, channel: Any) -> tuple[str, str] | None:
        parts = channel.split(".") if isinstance(channel, str) else []
        if len(parts) == 3 and parts[0] == "trades" and parts[2] in INTERVALS:
            sym = self._by_name.get(parts[1])
            return ("trade", sym) if sym else None
        if len(parts) == 2 and parts[0] == "quote":
            sym = self._by_name.get(parts[1])
            return ("quote", sym) if sym else None
        return None

    def _send(self, key: tuple[str, str], data: str) -> int:
        """Send ``data`` to each subscriber of ``key`` on the channel name it asked for."""
        group = self.hub.subscribers(self.name, key)
        for c in tuple(group):
            self.hub.push(c, NOTIFY % (c.state["channels"].get(key, ""), data))
        return len(group)

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        m = self.markets[symbol]
        led = self.faults.ledger(symbol)
        key = ("trade", symbol)
        if items:
            trades = []
            for kind, t in items:
                if kind is TRADE:
                    trades.append(_trade(m, t))
                    continue
                data = f"[{_malformed(kind, m, t)}]"
                if kind == "invalid_json":
                    data = data[: len(data) // 2]
                group = tuple(self.hub.subscribers(self.name, key))
                texts = [NOTIFY % (c.state["channels"].get(key, ""), data) for c in group]
                for c, text in zip(group, texts, strict=True):
                    self.hub.push(c, text)
                led.note_malformed(kind, t.id, sorted(set(texts)), len(group))
            if trades:
                self._send(key, f"[{','.join(trades)}]")
        if (items or quotes) and self._send(("quote", symbol), _quote(m, m.quote(now_ms))):
            led.quotes_sent += 1

    def heartbeat(self, now_ms: int) -> None:
        for c in tuple(self.hub.clients[self.name]):
            every = c.state.get("heartbeat_ms")
            if not every or now_ms < c.state["next_beat_ms"]:
                continue
            if c.state["test_pending"]:
                self.hub.close(c, 1000, "heartbeat test_request not answered")
                continue
            c.state.update(next_beat_ms=now_ms + every, test_pending=True)
            self.push(c, TEST_REQUEST)


# ---- REST ---------------------------------------------------------------------------------

PAGE = 1000


class DeribitRest:
    """``GET /api/v2/public/get_last_trades_by_instrument?instrument_name=&start_seq=&end_seq=
    &count=&sorting=`` (by sequence; without ``start_seq`` the newest ``count``) and
    ``.../get_last_trades_by_instrument_and_time?instrument_name=&start_timestamp=
    &end_timestamp=&count=&sorting=`` (inclusive ms): ``{"jsonrpc":"2.0","result":
    {"trades":[...],"has_more":bool}}``; errors are JSON-RPC errors with HTTP 400."""

    PATHS = (
        "/api/v2/public/get_last_trades_by_instrument",
        "/api/v2/public/get_last_trades_by_instrument_and_time",
    )

    def __init__(self, markets: dict[str, Market]):
        self.by_name = {venue_symbol(s): m for s, m in markets.items()}
        self.requests = 0

    def handles(self, path: str) -> bool:
        return path in self.PATHS

    def handle(self, path: str, params: dict[str, str], now_ms: int) -> tuple[int, dict]:
        self.requests += 1
        m = self.by_name.get(params.get("instrument_name", ""))
        if m is None:
            return 400, _error(10021, "instrument_not_found", "instrument_name")
        try:
            count = min(PAGE, max(1, int(params.get("count") or 10)))
            if path == self.PATHS[0]:
                rows = self._by_seq(m, params, count)
            else:
                start = m.index_at(int(params["start_timestamp"]))
                stop = m.index_at(int(params["end_timestamp"]) + 1)
                rows = m.rows(start, min(stop, start + count + 1))
        except (KeyError, ValueError):
            return 400, _error(-32602, "Invalid params", "")
        more = len(rows) > count
        rows = rows[:count]
        if params.get("sorting") == "desc":
            rows.reverse()
        # JSON numbers as Deribit sends them: the server re-encodes these floats by their
        # shortest repr, which is the decimal written (prices and sizes have < 15 digits).
        trades = json.loads(f"[{','.join(_trade(m, t) for t in rows)}]")
        return 200, {"jsonrpc": "2.0", "result": {"trades": trades, "has_more": more}}

    def _by_seq(self, m: Market, params: dict[str, str], count: int) -> list[TradeRow]:
        if "start_seq" not in params:
            return m.recent(count)
        first, last = int(params["start_seq"]), int(params.get("end_seq") or 2**62)
        return [t for t in m.from_id(first, count + 1) if t.id <= last]


def _error(code: int, message: str, data: str) -> dict:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}}
