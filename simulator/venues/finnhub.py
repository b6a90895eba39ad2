"""Finnhub's trade stream over WebSocket, at ``/finnhub?token=<token>``, and its candles.

The handshake needs the token: a missing or wrong one is refused with HTTP 401
Unauthorized and no WebSocket, as Finnhub refuses it (``refuse``). The simulator accepts
``TOKEN`` only (not a secret: this is a local test double; ``tasks.venues.finnhub``
sends the same when pointed here), so a real token never has a reason to come here.

Frames from the client: ``{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}`` and
``{"type":"unsubscribe",...}``; an unknown symbol is silently ignored, as on Finnhub;
anything else is answered ``{"type":"error","msg":...}``. To the client: each tick's
trades of a symbol in one ``{"type":"trade","data":[{"p":..,"s":..,"t":..,"v":..,
"c":..}]}`` (prices and volumes JSON numbers; ``c`` null for crypto and forex, a list for
stocks), and ``{"type":"ping"}`` every ``PING_S`` to every connection, subscribed or not.

Markets are named from the canonical symbols the way the adapter maps them: ``X-USD`` is
the stock ``X``, ``B-Q<EXCHANGE>`` is ``EXCHANGE:<B><sep><Q>`` (``BTC-USDTBINANCE`` ->
``BINANCE:BTCUSDT``, ``EUR-USDOANDA`` -> ``OANDA:EUR_USD``); other markets are not on
this venue.

Faults: drop, stall, shutdown (Finnhub has no notice: it only closes), duplicate (the same
trade twice: same content, so the same dedupe key) and malformed frames all apply. Gaps do
not: Finnhub's trades carry no ids, so a skipped trade is invisible to a client and
cannot be repaired; the server refuses gap settings for this venue instead of producing
a loss no test could name.
"""

from __future__ import annotations

import json
from typing import Any

from simulator.faults import TRADE
from simulator.hub import Client
from simulator.market import Market, QuoteRow, TradeRow
from simulator.venues import Items, VenueBase
from simulator.wire import fmt_units

NAME = "finnhub"
TOKEN = "tapeline-simulator"
PING_S = 5  # Finnhub's own come every one to two minutes; sooner keeps tests short
EXCHANGES = {"BINANCE": "", "COINBASE": "-", "OANDA": "_", "FXCM": "/"}
TRADE_FMT = '{"c":%s,"p":%s,"s":"%s","t":%d,"v":%s}'
STOCK_CONDITIONS = '["1","12"]'
PING = '{"type":"ping"}'
CANDLE_PATHS = ("/api/v1/stock/candle", "/api/v1/crypto/candle", "/api/v1/forex/candle")
RESOLUTIONS_MS = {
    "1": 60_000, "5": 300_000, "15": 900_000, "30": 1_800_000, "60": 3_600_000,
    "D": 86_400_000,
}  # fmt: skip
UNAUTHORIZED = {"error": "Invalid API key."}


def venue_symbol(symbol: str) -> str | None:
    """AAPL-USD -> AAPL, BTC-USDTBINANCE -> BINANCE:BTCUSDT; None for other markets."""
    base, _, quote = symbol.partition("-")
    if quote == "USD":
        return base
    for exchange in sorted(EXCHANGES, key=len, reverse=True):
        if quote.endswith(exchange) and len(quote) > len(exchange):
            return f"{exchange}:{base}{EXCHANGES[exchange]}{quote[: -len(exchange)]}"
    return None


def _trade(m: Market, name: str, t: TradeRow) -> str:
    conditions = "null" if ":" in name else STOCK_CONDITIONS
    return TRADE_FMT % (
        conditions, fmt_units(t.price, m.price_dp), name, t.ts_ms, fmt_units(t.qty, m.qty_dp)
    )  # fmt: skip


def _malformed(kind: str, m: Market, name: str, t: TradeRow) -> str:
    good = _trade(m, name, t)
    price = f'"p":{fmt_units(t.price, m.price_dp)},'
    if kind == "nan_price":
        return good.replace(price, '"p":NaN,', 1)
    if kind == "missing_field":
        return good.replace(price, "", 1)
    return good


def _frame(trades: list[str]) -> str:
    return '{"type":"trade","data":[%s]}' % ",".join(trades)


class Finnhub(VenueBase):
    name = NAME

    def __init__(self, hub, markets, faults):
        super().__init__(hub, markets, faults)
        self.names = {s: n for s in markets if (n := venue_symbol(s)) is not None}
        self._by_name = {n: s for s, n in self.names.items()}
        self._next_ping_ms = 0

    def accepts(self, path: str) -> bool:
        return path == "/finnhub"

    def refuse(self, path: str, query: dict[str, str]) -> tuple[int, dict] | None:
        """HTTP 401 for a handshake without the right token."""
        return None if query.get("token") == TOKEN else (401, UNAUTHORIZED)

    def receive(self, c: Client, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind not in ("subscribe", "unsubscribe") or not isinstance(msg.get("symbol"), str):
            self.push(c, json.dumps({"type": "error", "msg": "Invalid message"}))
            return
        sym = self._by_name.get(msg["symbol"])
        if sym is None:
            return  # Finnhub ignores a symbol it does not have
        if kind == "subscribe":
            self.hub.subscribe(c, ("trade", sym))
        else:
            self.hub.unsubscribe(c, ("trade", sym))

    def publish(self, symbol: str, items: Items, quotes: list[QuoteRow], now_ms: int) -> None:
        if not items:
            return
        m, name = self.markets[symbol], self.names[symbol]
        led = self.faults.ledger(symbol)
        key = ("trade", symbol)
        trades = []
        for kind, t in items:
            if kind is TRADE:
                trades.append(_trade(m, name, t))
                continue
            text = _frame([_malformed(kind, m, name, t)])
            if kind == "invalid_json":
                text = text[: len(text) // 2]
            led.note_malformed(kind, t.id, [text], self.hub.fan_out(self.name, key, text))
        if trades:
            self.hub.fan_out(self.name, key, _frame(trades))

    def heartbeat(self, now_ms: int) -> None:
        if now_ms < self._next_ping_ms:
            return
        self._next_ping_ms = now_ms + PING_S * 1000
        for c in tuple(self.hub.clients[self.name]):
            self.push(c, PING)


# ---- REST ---------------------------------------------------------------------------------


class FinnhubRest:
    """``GET /api/v1/<stock|crypto|forex>/candle?symbol=&resolution=&from=&to=`` (UNIX
    seconds, inclusive) with the token in ``X-Finnhub-Token`` (or ``token=``): candles
    of the market's history, ``{"c","h","l","o","t","v","s":"ok"}`` as JSON numbers, or
    ``{"s":"no_data"}``. A missing or wrong token is HTTP 401."""

    def __init__(self, markets: dict[str, Market]):
        self.by_name = {n: m for s, m in markets.items() if (n := venue_symbol(s)) is not None}
        self.requests = 0

    def handles(self, path: str) -> bool:
        return path in CANDLE_PATHS

    def handle(
        self, path: str, params: dict[str, str], now_ms: int, headers: Any = None
    ) -> tuple[int, dict]:
        self.requests += 1
        token = (headers.get("X-Finnhub-Token") if headers else None) or params.get("token")
        if token != TOKEN:
            return 401, UNAUTHORIZED
        m = self.by_name.get(params.get("symbol", ""))
        width = RESOLUTIONS_MS.get(params.get("resolution", ""))
        try:
            start, end = int(params["from"]) * 1000, int(params["to"]) * 1000
        except (KeyError, ValueError):
            return 422, {"error": "Wrong from/to parameters."}
        if width is None:
            return 422, {"error": "Wrong resolution."}
        bars = m.bars(width, start, end + 999, 5000) if m is not None else []
        if not bars:
            return 200, {"s": "no_data"}
        pdp, qdp = m.price_dp, m.qty_dp  # type: ignore[union-attr]

        def num(units: int, dp: int) -> Any:
            return json.loads(fmt_units(units, dp))  # the server re-encodes it as written

        return 200, {
            "c": [num(b.close, pdp) for b in bars],
            "h": [num(b.high, pdp) for b in bars],
            "l": [num(b.low, pdp) for b in bars],
            "o": [num(b.open, pdp) for b in bars],
            "t": [b.open_ms // 1000 for b in bars],
            "v": [num(b.volume, qdp) for b in bars],
            "s": "ok",
        }
