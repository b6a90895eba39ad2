"""Kraken spot WebSocket v2: ``trade`` and ``ticker`` channels.

Kraken sends prices and quantities as JSON *numbers*; ``loads`` reads them as exact
decimals, never through float. The ticker is subscribed with ``event_trigger: bbo`` so
it updates on every best-bid-offer change (the default triggers only on trades), which
is what a top-of-book Quote means. Trade ``side`` is documented as the taker's side.
Symbols are 'BTC/USD'; Kraken's legacy asset codes (XBT, XDG) are read as BTC, DOGE.
Trade ids are sequential per pair (documented for v2), so a hole is repaired from REST,
which pages by time only (``KrakenRest.trades_by_id``). ``parse_book`` reads the
``book`` channel, whose checksum ``tasks.books`` verifies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from tasks.core.events import Quote, Trade
from tasks.venues.base import FeedError, Parsed, VenueConfig, VenueSpec
from tasks.venues.depth import BookDelta, BookSnapshot, Level, level
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

CONFIG = VenueConfig("kraken", "wss://ws.kraken.com/v2", "https://api.kraken.com")
REST_INTERVAL_S = 1.0  # seconds between public REST requests (the venue's limit)
CHANNELS: dict[str, str] = {"trades": "trade", "quotes": "ticker", "books": "book"}
BOOK_DEPTHS = (10, 25, 100, 500, 1000)  # the depths the book channel offers
LEGACY_ASSETS: dict[str, str] = {"XBT": "BTC", "XDG": "DOGE"}
REST_ASSETS: dict[str, str] = {v: k for k, v in LEGACY_ASSETS.items()}  # REST pairs: XBTUSD
SIDES = frozenset({"buy", "sell"})


def canonical_pair(base: str, quote: str) -> str:
    """('XBT', 'USD') -> 'BTC-USD'."""
    base, quote = base.upper(), quote.upper()
    return f"{LEGACY_ASSETS.get(base, base)}-{LEGACY_ASSETS.get(quote, quote)}"


class Kraken(Adapter):
    """Venue adapter for Kraken WebSocket v2; pure (no sockets, no clock)."""

    symbol_kind = "Kraken pair"
    channels = ("trades", "quotes", "books")

    def __init__(self, config: VenueConfig | None = None):
        super().__init__(config or CONFIG)

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
            if c == "books":
                params |= {"depth": self.book_depth, "snapshot": True}
            frames.append(json.dumps({"method": "subscribe", "params": params, "req_id": n}))
        return frames

    @property
    def book_depth(self) -> int:
        """The depth the book channel is subscribed at: the smallest Kraken offers that
        holds ``config.book_depth`` levels. The book is kept at exactly this depth,
        because Kraken's checksum is computed over a book truncated to it."""
        wanted = self.config.book_depth
        return next((d for d in BOOK_DEPTHS if d >= wanted), BOOK_DEPTHS[-1])

    def book_resync_frames(self, symbols: list[str]) -> list[str]:
        """Unsubscribe, then subscribe again, the book of ``symbols``: Kraken answers
        the subscription with a fresh snapshot, which is how a pair's book is rebuilt."""
        params = {
            "channel": "book",
            "symbol": [self.to_venue_symbol(s) for s in symbols],
            "depth": self.book_depth,  # an unsubscription names the depth it ends (default 10)
        }
        return [
            json.dumps({"method": "unsubscribe", "params": params}),
            json.dumps({"method": "subscribe", "params": {**params, "snapshot": True}}),
        ]

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        channel = msg.get("channel")
        if channel == "trade":
            return Parsed([self._trade(d, recv_us) for d in self._data(msg)])
        if channel == "ticker":
            return Parsed([self._quote(d, recv_us) for d in self._data(msg)])
        if channel == "book":
            return Parsed(books=self._book(msg))
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

    def parse_book(self, raw: str | bytes) -> list[BookSnapshot | BookDelta]:
        """A ``book`` channel frame: one snapshot or update per pair in ``data``, each
        with Kraken's checksum. Levels keep the digits Kraken sent (the checksum's input)."""
        msg = loads(self.name, raw)
        if type(msg) is not dict or msg.get("channel") != "book":
            raise FeedError(f"{self.name}: not a book frame: {msg!r:.60}")
        return self._book(msg)

    def _book(self, msg: dict[str, Any]) -> list[BookSnapshot | BookDelta]:
        kind = msg.get("type")
        if kind not in ("snapshot", "update"):
            raise FeedError(f"{self.name}: book: unknown type {kind!r:.40}")
        books: list[BookSnapshot | BookDelta] = []
        for d in self._data(msg):
            with missing_fields(self.name, "book"):
                symbol = self._symbol(d["symbol"])
                bids, asks = self._levels(d["bids"], "bids"), self._levels(d["asks"], "asks")
                checksum = d["checksum"]
            if type(checksum) is not int or not 0 <= checksum < 2**32:
                raise FeedError(f"{self.name}: checksum: not an unsigned 32-bit {checksum!r:.40}")
            if kind == "snapshot":
                books.append(BookSnapshot(self.name, symbol, bids, asks, checksum=checksum))
            else:
                stamp = d.get("timestamp")
                event_us = None if stamp is None else rfc3339_to_us(self.name, "timestamp", stamp)
                books.append(
                    BookDelta(self.name, symbol, bids, asks, checksum=checksum, event_us=event_us)
                )
        return books

    def _levels(self, rows: Any, field: str) -> tuple[Level, ...]:
        """[{"price": 0.5666, "qty": 4831.75496356}, ...]"""
        if type(rows) is not list:
            raise FeedError(f"{self.name}: {field}: expected an array, got {rows!r:.60}")
        levels = []
        for row in rows:
            if type(row) is not dict:
                raise FeedError(f"{self.name}: {field}[]: expected an object, got {row!r:.60}")
            with missing_fields(self.name, field):
                levels.append(level(self.name, field, row["price"], row["qty"]))
        return tuple(levels)

    def _data(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        data = msg.get("data")
        if type(data) is not list:
            raise FeedError(f"{self.name}: data: expected an array, got {data!r:.60}")
        for d in data:
            if type(d) is not dict:
                raise FeedError(f"{self.name}: data[]: expected an object, got {d!r:.60}")
        return data

    def _trade(self, d: dict[str, Any], recv_us: int) -> Trade:
        with missing_fields(self.name, "trade"):
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
        return build(self.name, "trade", wire)

    def _quote(self, d: dict[str, Any], recv_us: int) -> Quote:
        ts = d.get("timestamp")  # present on newer payloads; else the receive time
        with missing_fields(self.name, "ticker"):
            pair = d["symbol"]
            wire = {
                "v": 1, "t": "quote", "venue": self.name, "symbol": self._symbol(pair),
                "venue_symbol": pair, "update_id": None,
                "bid_price": self._dec(d, "bid"), "bid_qty": self._dec(d, "bid_qty"),
                "ask_price": self._dec(d, "ask"), "ask_qty": self._dec(d, "ask_qty"),
                "event_us": recv_us if ts is None else rfc3339_to_us(self.name, "timestamp", ts),
                "recv_us": recv_us,
            }  # fmt: skip
        return build(self.name, "ticker", wire)


class KrakenRest(IdsByTime):
    """Kraken public trades, ``/0/public/Trades?pair=&since=``, paged by the ``last``
    cursor (nanoseconds). Limits: up to 1000 trades per call and about one public call
    per second (hence 1 s pacing); rate-limit errors arrive with HTTP 200 and are retried
    with backoff. Rows: [price, volume, time (s), b/s (taker), m/l, misc, trade_id]."""

    RETRYABLE = (
        "EAPI:Rate limit exceeded", "EGeneral:Too many requests", "EService:Unavailable",
        "EService:Busy",
    )  # fmt: skip

    def __init__(self, config: VenueConfig | None = None, http: Http | None = None):
        self.venue = Kraken(config)
        self.name = self.venue.config.name
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=REST_INTERVAL_S)

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterator[Trade]:
        """Trades with start_us <= time < end_us, oldest first."""
        base, quote_asset = self.venue.to_venue_symbol(symbol).split("/")
        pair = REST_ASSETS.get(base, base) + REST_ASSETS.get(quote_asset, quote_asset)
        since = start_us * 1000 - 1  # trades strictly after `since` (nanoseconds)
        while True:
            body = self.http.get_json(
                "/0/public/Trades", {"pair": pair, "since": since}, self._retry_on
            )
            result = body.get("result") if type(body) is dict else None
            rows = (
                next((v for k, v in result.items() if k != "last"), [])
                if type(result) is dict
                else None
            )
            if type(rows) is not list or body.get("error"):
                raise RestError(f"{self.name} Trades {pair}: {str(body)[:200]}")
            for row in rows:
                t = self._trade(symbol, row)
                if t.event_us >= end_us:
                    return
                if t.event_us >= start_us:
                    yield t
            last = str(result.get("last", ""))
            if not rows or not last.isdigit() or int(last) <= since:
                return
            since = int(last)

    def _retry_on(self, body: Any) -> str | None:
        errors = body.get("error") if type(body) is dict else None
        return next((e for e in errors or () if str(e).startswith(self.RETRYABLE)), None)

    def _trade(self, symbol: str, row: Any) -> Trade:
        with bad_rows(self.name, "rest trade", row):
            price, volume, when, side, _kind, _misc, tid = row[:7]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": self.venue.to_venue_symbol(symbol), "trade_id": tid,
                "price": decimal_text(self.name, "price", price),
                "qty": decimal_text(self.name, "volume", volume),
                "side": {"b": "buy", "s": "sell"}.get(side, side),
                "event_us": int(Decimal(decimal_text(self.name, "time", when)) * 1_000_000),
                "recv_us": now_us(self.http),
            }  # fmt: skip
        return build(self.name, "rest trade", wire)


SPEC = VenueSpec(
    "kraken", CONFIG, Kraken, KrakenRest, rest_interval_s=REST_INTERVAL_S,
    simulator_ws_path="/kraken", sequential_ids=True, book_sync="kraken",
)  # fmt: skip
