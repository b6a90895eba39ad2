"""Coinbase Advanced Trade market-data WebSocket: ``market_trades`` and ``ticker``.

One subscribe frame per channel (plus ``heartbeats``, which keeps quiet products'
connections from being closed). Frames are ``{"channel", "timestamp", "sequence_num",
"events": [...]}``; product ids are already canonical ('BTC-USD').

Trade side: Coinbase documents the ``side`` of its public trades (Exchange ``match``
messages and product trades) as the *maker* order's side: "buy" is a down-tick where a
resting buy was hit. The Advanced Trade ``market_trades`` reference does not restate
it, and its trades come from the same matching engine, so we read it the same way and
flip it: our Trade.side is the taker's. ``SIDE_IS_MAKER`` holds that one decision.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.events import Quote, Trade
from tasks.feeds.base import FeedError, Parsed, VenueConfig
from tasks.feeds.common import build, decimal_text, loads, rfc3339_to_us, shard

CONFIG = VenueConfig(
    name="coinbase",
    ws_url="wss://advanced-trade-ws.coinbase.com",
    rest_url="https://api.coinbase.com",
)
CHANNELS: dict[str, str] = {"trades": "market_trades", "quotes": "ticker"}
SIDE_IS_MAKER = True
_TAKER_SIDE = {"BUY": "sell", "SELL": "buy"} if SIDE_IS_MAKER else {"BUY": "buy", "SELL": "sell"}


def trade_id(venue: str, v: Any) -> int:
    """Coinbase trade ids are decimal digit strings ('000000123' or '123')."""
    if type(v) is int:
        return v
    if type(v) is str and v.isascii() and v.isdigit():
        return int(v)
    raise FeedError(f"{venue}: trade_id: expected digits, got {v!r:.60}")


def taker_side(venue: str, v: Any) -> str:
    try:
        return _TAKER_SIDE[v.upper()]
    except (KeyError, AttributeError):
        raise FeedError(f"{venue}: side: unknown side {v!r:.60}") from None


class Coinbase:
    """Venue adapter for Coinbase Advanced Trade; pure (no sockets, no clock)."""

    channels = ("trades", "quotes")

    def __init__(self, config: VenueConfig | None = None):
        self.config = config or CONFIG
        self.name = self.config.name

    def to_venue_symbol(self, symbol: str) -> str:
        return self._check(symbol.upper())

    def to_canonical(self, venue_symbol: str) -> str:
        return self._check(venue_symbol.upper())

    def _check(self, symbol: str) -> str:
        base, sep, quote = symbol.partition("-")
        if not base or not sep or not quote or "-" in quote:
            raise ValueError(f"{self.name}: not a product id: {symbol!r:.40}")
        return symbol

    def shards(
        self, symbols: list[str], channels: list[str], shard_size: int | None = None
    ) -> list[list[str]]:
        return shard(symbols, len(channels), self.config.max_streams_per_connection, shard_size)

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        return self.config.ws_url

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """One frame per channel, then ``heartbeats``; send at config.subscribe_rate_per_s."""
        products = [self.to_venue_symbol(s) for s in symbols]
        names = []
        for c in channels:
            if c not in CHANNELS:
                raise ValueError(f"{self.name}: unknown channel {c!r}")
            names.append(CHANNELS[c])
        return [
            json.dumps({"type": "subscribe", "product_ids": products, "channel": name})
            for name in [*names, "heartbeats"]
        ]

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        channel = msg.get("channel")
        if channel == "market_trades":
            events = self._events(msg)
            return Parsed(
                [self._trade(t, recv_us) for ev in events for t in self._list(ev, "trades")]
            )
        if channel == "ticker":
            return self._tickers(msg, recv_us)
        if channel == "heartbeats":
            events = self._events(msg)
            counter = events[0].get("heartbeat_counter") if events else None
            return Parsed(control="heartbeat", detail=f"counter={counter}")
        if channel == "subscriptions":
            events = self._events(msg)
            subs = events[0].get("subscriptions") if events else None
            return Parsed(control="ack", detail=json.dumps(subs, default=str)[:500])
        if msg.get("type") == "error":
            return Parsed(control="error", detail=str(msg.get("message"))[:500])
        raise FeedError(f"{self.name}: unknown frame, channel {channel!r:.40}")

    def _events(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._list(msg, "events")
        for ev in events:
            if type(ev) is not dict:
                raise FeedError(f"{self.name}: events[]: expected an object, got {ev!r:.60}")
        return events

    def _list(self, obj: dict[str, Any], field: str) -> list[Any]:
        v = obj.get(field)
        if type(v) is not list:
            raise FeedError(f"{self.name}: {field}: expected an array, got {v!r:.60}")
        return v

    def _trade(self, t: Any, recv_us: int) -> Trade:
        if type(t) is not dict:
            raise FeedError(f"{self.name}: trades[]: expected an object, got {t!r:.60}")
        try:
            product = t["product_id"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": self._symbol(product),
                "venue_symbol": product, "trade_id": trade_id(self.name, t["trade_id"]),
                "price": self._dec(t, "price"), "qty": self._dec(t, "size"),
                "side": taker_side(self.name, t["side"]),
                "event_us": rfc3339_to_us(self.name, "time", t["time"]), "recv_us": recv_us,
            }  # fmt: skip
        except KeyError as k:
            raise FeedError(f"{self.name} market_trades: missing field {k}") from None
        return build(self.name, "market_trades", wire)

    def _tickers(self, msg: dict[str, Any], recv_us: int) -> Parsed:
        seq = msg.get("sequence_num")
        event_us = rfc3339_to_us(self.name, "timestamp", msg.get("timestamp"))
        quotes: list[Trade | Quote] = []
        for ev in self._events(msg):
            for t in self._list(ev, "tickers"):
                if type(t) is not dict:
                    raise FeedError(f"{self.name}: tickers[]: expected an object, got {t!r:.60}")
                try:
                    product = t["product_id"]
                    wire = {
                        "v": 1, "t": "quote", "venue": self.name,
                        "symbol": self._symbol(product), "venue_symbol": product,
                        "update_id": seq,
                        "bid_price": self._dec(t, "best_bid"),
                        "bid_qty": self._dec(t, "best_bid_quantity"),
                        "ask_price": self._dec(t, "best_ask"),
                        "ask_qty": self._dec(t, "best_ask_quantity"),
                        "event_us": event_us, "recv_us": recv_us,
                    }  # fmt: skip
                except KeyError as k:
                    raise FeedError(f"{self.name} ticker: missing field {k}") from None
                quotes.append(build(self.name, "ticker", wire))
        return Parsed(quotes)

    def _dec(self, obj: dict[str, Any], field: str) -> str:
        return decimal_text(self.name, field, obj[field])

    def _symbol(self, product: Any) -> str:
        try:
            return self.to_canonical(product)
        except (ValueError, AttributeError):
            raise FeedError(f"{self.name}: product_id: not a product id: {product!r:.60}") from None
