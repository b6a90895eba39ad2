"""Kraken spot WebSocket v2: ``trade`` and ``ticker`` channels.

Kraken sends prices and quantities as JSON *numbers*; ``loads`` reads them as exact
decimals, never through float. The ticker is subscribed with ``event_trigger: bbo`` so
it updates on every best-bid-offer change (the default triggers only on trades), which
is what a top-of-book Quote means. Trade ``side`` is documented as the taker's side.
Symbols are 'BTC/USD'; Kraken's legacy asset codes (XBT, XDG) are read as BTC, DOGE.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.events import Quote, Trade
from tasks.feeds.base import FeedError, Parsed, VenueConfig
from tasks.feeds.common import build, decimal_text, loads, rfc3339_to_us, shard

CONFIG = VenueConfig(
    name="kraken",
    ws_url="wss://ws.kraken.com/v2",
    rest_url="https://api.kraken.com",
)
CHANNELS: dict[str, str] = {"trades": "trade", "quotes": "ticker"}
LEGACY_ASSETS: dict[str, str] = {"XBT": "BTC", "XDG": "DOGE"}
REST_ASSETS: dict[str, str] = {v: k for k, v in LEGACY_ASSETS.items()}  # REST pairs: XBTUSD
SIDES = frozenset({"buy", "sell"})


def canonical_pair(base: str, quote: str) -> str:
    """('XBT', 'USD') -> 'BTC-USD'."""
    base, quote = base.upper(), quote.upper()
    return f"{LEGACY_ASSETS.get(base, base)}-{LEGACY_ASSETS.get(quote, quote)}"


class Kraken:
    """Venue adapter for Kraken WebSocket v2; pure (no sockets, no clock)."""

    channels = ("trades", "quotes")

    def __init__(self, config: VenueConfig | None = None):
        self.config = config or CONFIG
        self.name = self.config.name

    def to_venue_symbol(self, symbol: str) -> str:
        base, sep, quote = symbol.upper().partition("-")
        if not base or not sep or not quote or "-" in quote:
            raise ValueError(f"{self.name}: not a canonical symbol: {symbol!r:.40}")
        return f"{base}/{quote}"

    def to_canonical(self, venue_symbol: str) -> str:
        base, sep, quote = venue_symbol.partition("/")
        if not base or not sep or not quote or "/" in quote:
            raise ValueError(f"{self.name}: not a Kraken pair: {venue_symbol!r:.40}")
        return canonical_pair(base, quote)

    def shards(
        self, symbols: list[str], channels: list[str], shard_size: int | None = None
    ) -> list[list[str]]:
        return shard(symbols, len(channels), self.config.max_streams_per_connection, shard_size)

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        return self.config.ws_url

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """One frame per channel (req_id 1, 2, ...); send at config.subscribe_rate_per_s.
        Kraken acks each symbol separately."""
        pairs = [self.to_venue_symbol(s) for s in symbols]
        frames = []
        for n, c in enumerate(channels, start=1):
            if c not in CHANNELS:
                raise ValueError(f"{self.name}: unknown channel {c!r}")
            params: dict[str, Any] = {"channel": CHANNELS[c], "symbol": pairs}
            if c == "quotes":
                params["event_trigger"] = "bbo"
            frames.append(json.dumps({"method": "subscribe", "params": params, "req_id": n}))
        return frames

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        channel = msg.get("channel")
        if channel == "trade":
            return Parsed([self._trade(d, recv_us) for d in self._data(msg)])
        if channel == "ticker":
            return Parsed([self._quote(d, recv_us) for d in self._data(msg)])
        if channel == "heartbeat":
            return Parsed(control="heartbeat")
        if channel == "status":
            data = self._data(msg)
            system = data[0].get("system") if data else None
            return Parsed(control="status", detail=f"system={system}")
        method = msg.get("method")
        if method == "pong":
            return Parsed(control="pong")
        if "success" in msg:
            if msg["success"] is True:
                return Parsed(control="ack", detail=f"{method} {msg.get('result')}"[:500])
            return Parsed(control="error", detail=f"{method}: {msg.get('error')}"[:500])
        raise FeedError(f"{self.name}: unknown frame, channel {channel!r:.40}")

    def _data(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        data = msg.get("data")
        if type(data) is not list:
            raise FeedError(f"{self.name}: data: expected an array, got {data!r:.60}")
        for d in data:
            if type(d) is not dict:
                raise FeedError(f"{self.name}: data[]: expected an object, got {d!r:.60}")
        return data

    def _trade(self, d: dict[str, Any], recv_us: int) -> Trade:
        try:
            pair, side = d["symbol"], d["side"]
            if type(side) is not str or side not in SIDES:
                raise FeedError(f"{self.name}: side: unknown side {side!r:.60}")
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": self._symbol(pair),
                "venue_symbol": pair, "trade_id": d["trade_id"],
                "price": self._dec(d, "price"), "qty": self._dec(d, "qty"), "side": side,
                "event_us": rfc3339_to_us(self.name, "timestamp", d["timestamp"]),
                "recv_us": recv_us,
            }  # fmt: skip
        except KeyError as k:
            raise FeedError(f"{self.name} trade: missing field {k}") from None
        return build(self.name, "trade", wire)

    def _quote(self, d: dict[str, Any], recv_us: int) -> Quote:
        ts = d.get("timestamp")  # present on newer payloads; else the receive time
        try:
            pair = d["symbol"]
            wire = {
                "v": 1, "t": "quote", "venue": self.name, "symbol": self._symbol(pair),
                "venue_symbol": pair, "update_id": None,
                "bid_price": self._dec(d, "bid"), "bid_qty": self._dec(d, "bid_qty"),
                "ask_price": self._dec(d, "ask"), "ask_qty": self._dec(d, "ask_qty"),
                "event_us": recv_us if ts is None else rfc3339_to_us(self.name, "timestamp", ts),
                "recv_us": recv_us,
            }  # fmt: skip
        except KeyError as k:
            raise FeedError(f"{self.name} ticker: missing field {k}") from None
        return build(self.name, "ticker", wire)

    def _dec(self, obj: dict[str, Any], field: str) -> str:
        return decimal_text(self.name, field, obj[field])

    def _symbol(self, pair: Any) -> str:
        try:
            return self.to_canonical(pair)
        except (ValueError, AttributeError):
            raise FeedError(f"{self.name}: symbol: not a Kraken pair: {pair!r:.60}") from None
