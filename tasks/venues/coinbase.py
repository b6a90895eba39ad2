"""Coinbase Advanced Trade market-data WebSocket: ``market_trades`` and ``ticker``.

One subscribe frame per channel (plus ``heartbeats``, which keeps quiet products'
connections from being closed). Frames are ``{"channel", "timestamp", "sequence_num",
"events": [...]}``; product ids are already canonical ('BTC-USD'). ``sequence_num``
counts every message of one connection, so the adapter hands it on (``Parsed.sequence``)
and ingestion counts the messages that never arrived. Trade ids are sequential per
product: a hole is repaired from REST, which serves trades by time only
(``CoinbaseRest.trades_by_id``). The trades of one frame are handed over in id order
(a snapshot lists the newest first).

Trade side: Coinbase documents the ``side`` of its public trades (Exchange ``match``
messages and product trades) as the *maker* order's side: "buy" is a down-tick where a
resting buy was hit. The Advanced Trade ``market_trades`` reference does not restate
it, and its trades come from the same matching engine, so we read it the same way and
flip it: our Trade.side is the taker's. ``SIDE_IS_MAKER`` holds that one decision.

Order books: ``parse_level2`` reads the ``level2`` channel; ``tasks.books`` keeps each
connection's books in step by its ``sequence_num``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from operator import attrgetter
from typing import Any
from urllib.parse import quote

from tasks.core.events import Quote, Trade
from tasks.venues.base import FeedError, Parsed, VenueConfig, VenueSpec
from tasks.venues.depth import BookDelta, BookSnapshot, Level, level, update_id
from tasks.venues.http import Http, IdsByTime, RestError, now_us
from tasks.venues.parsing import (
    Adapter,
    bad_rows,
    build,
    decimal_text,
    loads,
    missing_fields,
    rfc3339_to_us,
)

CONFIG = VenueConfig("coinbase", "wss://advanced-trade-ws.coinbase.com", "https://api.coinbase.com")
REST_INTERVAL_S = 0.1  # seconds between public REST requests (the venue's limit)
CHANNELS: dict[str, str] = {"trades": "market_trades", "quotes": "ticker", "books": "level2"}
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


class Coinbase(Adapter):
    """Venue adapter for Coinbase Advanced Trade; pure (no sockets, no clock)."""

    symbol_field, symbol_kind = "product_id", "product id"
    channels = ("trades", "quotes", "books")

    def __init__(self, config: VenueConfig | None = None):
        super().__init__(config or CONFIG)

    def to_venue_symbol(self, symbol: str) -> str:
        return self._check(symbol.upper())

    def to_canonical(self, venue_symbol: str) -> str:
        return self._check(venue_symbol.upper())

    def _check(self, symbol: str) -> str:
        base, sep, quote = symbol.partition("-")
        if not base or not sep or not quote or "-" in quote:
            raise ValueError(f"{self.name}: not a product id: {symbol!r:.40}")
        return symbol

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
        parsed = self._parse(msg, recv_us)
        seq = msg.get("sequence_num")
        parsed.sequence = seq if type(seq) is int else None
        return parsed

    def _parse(self, msg: dict[str, Any], recv_us: int) -> Parsed:
        channel = msg.get("channel")
        if channel == "market_trades":
            events = self._events(msg)
            # A snapshot lists the newest trade first; gap repair wants id order.
            trades: list[Trade | Quote] = sorted(
                (self._trade(t, recv_us) for ev in events for t in self._list(ev, "trades")),
                key=attrgetter("trade_id"),
            )
            return Parsed(trades)
        if channel == "ticker":
            return self._tickers(msg, recv_us)
        if channel == "l2_data":
            return Parsed(books=self._level2(msg))
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

    def parse_level2(self, raw: str | bytes) -> tuple[int, list[BookSnapshot | BookDelta]]:
        """A ``level2`` frame (channel ``l2_data``): its ``sequence_num`` and one
        snapshot or update per event. ``new_quantity`` is the level's new size, not a
        change; sides are "bid" and "offer"."""
        msg = loads(self.name, raw)
        if type(msg) is not dict or msg.get("channel") != "l2_data":
            raise FeedError(f"{self.name}: not an l2_data frame: {msg!r:.60}")
        return update_id(self.name, "sequence_num", msg.get("sequence_num")), self._level2(msg)

    def _level2(self, msg: dict[str, Any]) -> list[BookSnapshot | BookDelta]:
        seq = update_id(self.name, "sequence_num", msg.get("sequence_num"))
        books: list[BookSnapshot | BookDelta] = []
        for ev in self._events(msg):
            kind = ev.get("type")
            if kind not in ("snapshot", "update"):
                raise FeedError(f"{self.name}: l2_data: unknown event type {kind!r:.40}")
            with missing_fields(self.name, "l2_data"):
                symbol = self._symbol(ev["product_id"])
            updates = self._list(ev, "updates")
            bids, asks = self._sides(updates)
            if kind == "snapshot":
                books.append(BookSnapshot(self.name, symbol, bids, asks, sequence=seq))
            else:
                event_us = max(
                    (rfc3339_to_us(self.name, "event_time", u["event_time"]) for u in updates
                     if "event_time" in u),
                    default=None,
                )  # fmt: skip
                books.append(BookDelta(self.name, symbol, bids, asks, seq, seq, event_us=event_us))
        return books

    def book_resync_frames(self, symbols: list[str]) -> list[str]:
        """Unsubscribe, then subscribe again, ``level2`` for ``symbols``: the new
        subscription starts with a snapshot of each, which is how their books are rebuilt."""
        products = [self.to_venue_symbol(s) for s in symbols]
        return [
            json.dumps({"type": t, "product_ids": products, "channel": "level2"})
            for t in ("unsubscribe", "subscribe")
        ]

    def _sides(self, updates: list[Any]) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        sides: dict[str, list[Level]] = {"bid": [], "offer": []}
        for u in updates:
            if type(u) is not dict:
                raise FeedError(f"{self.name}: updates[]: expected an object, got {u!r:.60}")
            with missing_fields(self.name, "l2_data update"):
                side = sides.get(u["side"]) if type(u["side"]) is str else None
                if side is None:
                    raise FeedError(f"{self.name}: updates[]: unknown side {u['side']!r:.40}")
                side.append(level(self.name, "updates[]", u["price_level"], u["new_quantity"]))
        return tuple(sides["bid"]), tuple(sides["offer"])

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
        with missing_fields(self.name, "market_trades"):
            product = t["product_id"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": self._symbol(product),
                "venue_symbol": product, "trade_id": trade_id(self.name, t["trade_id"]),
                "price": self._dec(t, "price"), "qty": self._dec(t, "size"),
                "side": taker_side(self.name, t["side"]),
                "event_us": rfc3339_to_us(self.name, "time", t["time"]), "recv_us": recv_us,
            }  # fmt: skip
        return build(self.name, "market_trades", wire)

    def _tickers(self, msg: dict[str, Any], recv_us: int) -> Parsed:
        seq = msg.get("sequence_num")
        event_us = rfc3339_to_us(self.name, "timestamp", msg.get("timestamp"))
        quotes: list[Trade | Quote] = []
        for ev in self._events(msg):
            for t in self._list(ev, "tickers"):
                if type(t) is not dict:
                    raise FeedError(f"{self.name}: tickers[]: expected an object, got {t!r:.60}")
                with missing_fields(self.name, "ticker"):
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
                quotes.append(build(self.name, "ticker", wire))
        return Parsed(quotes)


class CoinbaseRest(IdsByTime):
    """Coinbase Advanced Trade public trades,
    ``/api/v3/brokerage/market/products/{id}/ticker?limit=&start=&end=``.

    Limits: each call returns the newest ``limit`` trades (1000 here) between ``start``
    and ``end`` in whole UNIX seconds, so history is walked backwards; more than
    ``limit`` trades inside one second cannot be paged past and raise RestError. Public
    endpoints allow about 10 requests per second, hence the 0.1 s pacing.
    """

    def __init__(self, config: VenueConfig | None = None, http: Http | None = None):
        self.venue = Coinbase(config)
        self.name = self.venue.config.name
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=REST_INTERVAL_S)

    def trades_by_time(
        self, symbol: str, start_us: int, end_us: int, limit: int = 1000
    ) -> Iterator[Trade]:
        """Trades with start_us <= time < end_us, newest pages first. Each next page ends
        at the previous page's oldest second (which it may only partly hold), skipping
        trades already yielded; whether ``end`` is inclusive is learned from the replies."""
        product = self.venue.to_venue_symbol(symbol)
        path = f"/api/v3/brokerage/market/products/{quote(product)}/ticker"
        start_s, end_s = start_us // 1_000_000, -(-end_us // 1_000_000)
        seen: dict[int, int] = {}  # trade id -> second, for the seconds the next page may repeat
        end_inclusive = False
        while True:
            body = self.http.get_json(path, {"limit": limit, "start": start_s, "end": end_s})
            rows = body.get("trades") if type(body) is dict else None
            if type(rows) is not list:
                raise RestError(f"{self.name} {path}: expected trades, got {str(body)[:200]}")
            trades = [self._trade(r) for r in rows]
            fresh = [t for t in trades if t.trade_id not in seen]
            yield from (t for t in fresh if start_us <= t.event_us < end_us)
            if len(rows) < limit:
                return
            if not fresh:
                raise RestError(f"{self.name} {product}: over {limit} trades in one second")
            seconds = {t.trade_id: t.event_us // 1_000_000 for t in trades}
            end_inclusive = end_inclusive or end_s in seconds.values()
            oldest = min(seconds.values())
            seen = {i: s for i, s in (seen | seconds).items() if s >= oldest}
            end_s = oldest if end_inclusive else oldest + 1

    def _trade(self, r: Any) -> Trade:
        with bad_rows(self.name, "rest trade", r):
            product = r["product_id"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name,
                "symbol": self.venue.to_canonical(product), "venue_symbol": product,
                "trade_id": trade_id(self.name, r["trade_id"]),
                "price": decimal_text(self.name, "price", r["price"]),
                "qty": decimal_text(self.name, "size", r["size"]),
                "side": taker_side(self.name, r["side"]),
                "event_us": rfc3339_to_us(self.name, "time", r["time"]),
                "recv_us": now_us(self.http),
            }  # fmt: skip
        return build(self.name, "rest trade", wire)


SPEC = VenueSpec(
    "coinbase", CONFIG, Coinbase, CoinbaseRest, rest_interval_s=REST_INTERVAL_S,
    simulator_ws_path="/coinbase", sequential_ids=True, book_sync="coinbase",
)  # fmt: skip
