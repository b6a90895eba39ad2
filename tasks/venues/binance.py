"""Binance spot (and Binance US: same protocol, other hosts) combined streams.

Streams ``<symbol>@trade`` and ``<symbol>@bookTicker`` are subscribed in the URL
(``/stream?streams=a/b/c``), at most ``max_streams_per_connection`` (1024) per
connection; ``shards`` splits a symbol list accordingly. ``subscription_frames`` gives
the SUBSCRIBE/UNSUBSCRIBE JSON frames for live changes; Binance allows 5 incoming
messages per second per connection, which the caller paces at
``config.subscribe_rate_per_s``.

Frames arrive as ``{"stream": ..., "data": {...}}`` envelopes (or raw payloads on
``/ws``). Times are epoch milliseconds, scaled to microseconds.

Order books: ``parse_depth`` reads the diff depth stream (``<symbol>@depth``) and
``depth_snapshot`` the REST ``/api/v3/depth`` reply; ``tasks.books`` keeps them in step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Context, Decimal
from functools import partial
from typing import Any

from tasks.core.events import Candle, Quote, Trade
from tasks.venues.base import FeedError, Parsed, VenueConfig, VenueSpec
from tasks.venues.depth import BookDelta, BookSnapshot, Level, level, update_id
from tasks.venues.http import HOUR_US, Http, RestError, by_id_from, contiguous, now_us
from tasks.venues.parsing import (
    Adapter,
    bad_rows,
    build,
    loads,
    missing,
    missing_fields,
    ms_to_us,
    split_concatenated,
)

CONFIGS: dict[str, VenueConfig] = {
    "binance": VenueConfig(
        name="binance",
        ws_url="wss://stream.binance.com:9443",
        rest_url="https://api.binance.com",
    ),
    "binanceus": VenueConfig(
        name="binanceus",
        ws_url="wss://stream.binance.us:9443",
        rest_url="https://api.binance.us",
    ),
}

# Longest first, so BTCFDUSD is BTC-FDUSD (not BTCFD-USD) and BTCTUSD is BTC-TUSD.
_QUOTES = [
    "USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USDP", "DAI", "USD", "BTC", "ETH", "BNB", "EUR",
    "TRY", "GBP", "BRL", "AUD", "JPY", "ARS", "MXN", "PLN", "RON", "ZAR", "UAH", "IDR", "NGN",
    "COP", "CZK", "XRP", "TRX", "DOGE", "SOL",
]  # fmt: skip
QUOTE_ASSETS: tuple[str, ...] = tuple(sorted(_QUOTES, key=len, reverse=True))
MAX_CACHED_SYMBOLS = 8192
STREAMS: dict[str, str] = {"trades": "trade", "quotes": "bookTicker", "books": "depth@100ms"}
# The ``limit`` values /api/v3/depth accepts (levels a side of the REST snapshot).
DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000, 5000)
_VWAP = Context(prec=28)


def default_config(name: str) -> VenueConfig:
    """The public endpoints of 'binance' or 'binanceus'."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"not a Binance venue: {name!r}; known: {sorted(CONFIGS)}") from None


class Binance(Adapter):
    """Venue adapter for Binance-protocol spot streams; pure (no sockets, no clock)."""

    channels = ("trades", "quotes", "books")

    def __init__(self, config: VenueConfig | None = None):
        super().__init__(config or CONFIGS["binance"])
        # venue -> canonical. Symbols we were asked for map back exactly, whatever the
        # suffix rule would say; the rest are learned as frames name them (bounded).
        self._canonical: dict[str, str] = {}

    # -- symbols -------------------------------------------------------------------------

    def to_venue_symbol(self, symbol: str) -> str:
        base, sep, quote = symbol.upper().partition("-")
        if not base or not sep or not quote or "-" in quote:
            raise ValueError(f"not a canonical symbol: {symbol!r}")
        venue_symbol = base + quote
        self._canonical[venue_symbol] = f"{base}-{quote}"
        return venue_symbol

    def to_canonical(self, venue_symbol: str) -> str:
        vs = venue_symbol.upper()
        canonical = self._canonical.get(vs)
        if canonical is None:
            base, quote = split_concatenated(vs, QUOTE_ASSETS)
            canonical = f"{base}-{quote}"
            if len(self._canonical) < MAX_CACHED_SYMBOLS:
                self._canonical[vs] = canonical
        return canonical

    # -- subscribing ---------------------------------------------------------------------

    def streams(self, symbols: list[str], channels: list[str]) -> list[str]:
        """Stream names, e.g. ['btcusdt@trade', 'btcusdt@bookTicker']."""
        kinds = [self._stream_kind(c) for c in channels]
        return [f"{self.to_venue_symbol(s).lower()}@{k}" for s in symbols for k in kinds]

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        streams = self._checked_streams(symbols, channels)
        return f"{self.config.ws_url.rstrip('/')}/stream?streams={'/'.join(streams)}"

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """None needed: ``connection_url`` subscribes."""
        return []

    def subscription_frames(
        self,
        symbols: list[str],
        channels: list[str],
        *,
        unsubscribe: bool = False,
        first_id: int = 1,
        per_frame: int | None = None,
    ) -> list[str]:
        """SUBSCRIBE (or UNSUBSCRIBE) frames with ids first_id, first_id+1, ... each
        carrying at most ``per_frame`` streams; send them no faster than
        ``config.subscribe_rate_per_s``. Acks come back as Parsed(control='ack')."""
        streams = self._checked_streams(symbols, channels)
        per = per_frame or self.config.max_streams_per_connection
        method = "UNSUBSCRIBE" if unsubscribe else "SUBSCRIBE"
        return [
            json.dumps(
                {"method": method, "params": streams[i : i + per], "id": first_id + n},
                separators=(",", ":"),
            )
            for n, i in enumerate(range(0, len(streams), per))
        ]

    def _stream_kind(self, channel: str) -> str:
        try:
            return STREAMS[channel]
        except KeyError:
            raise ValueError(f"{self.name}: unknown channel {channel!r}") from None

    def _checked_streams(self, symbols: list[str], channels: list[str]) -> list[str]:
        streams = self.streams(symbols, channels)
        if not streams:
            raise ValueError(f"{self.name}: no streams to subscribe")
        if len(streams) > self.config.max_streams_per_connection:
            raise ValueError(
                f"{self.name}: {len(streams)} streams exceed "
                f"{self.config.max_streams_per_connection} per connection; use shards()"
            )
        return streams

    # -- parsing -------------------------------------------------------------------------

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        if "data" in msg:  # combined-stream envelope
            msg = msg["data"]
            if type(msg) is not dict:
                raise FeedError(f"{self.name}: envelope data is not an object: {msg!r:.60}")
        e = msg.get("e")
        if e == "trade":
            return Parsed([self._trade(msg, recv_us)])
        if e == "depthUpdate":
            return Parsed(books=[self._depth(msg)])
        if "u" in msg and (e is None or e == "bookTicker"):
            return Parsed([self._quote(msg, recv_us)])
        return self._control(msg)

    def parse_depth(self, raw: str | bytes) -> BookDelta:
        """A diff depth frame (``<symbol>@depth``; raw or in the combined envelope):
        the levels that changed between update ids ``U`` and ``u``."""
        msg = loads(self.name, raw)
        if type(msg) is dict and "data" in msg:
            msg = msg["data"]
        if type(msg) is not dict or msg.get("e") != "depthUpdate":
            raise FeedError(f"{self.name}: not a depthUpdate frame: {msg!r:.60}")
        return self._depth(msg)

    def _depth(self, msg: dict[str, Any]) -> BookDelta:
        with missing_fields(self.name, "depthUpdate"):
            first = update_id(self.name, "U", msg["U"])
            last = update_id(self.name, "u", msg["u"])
            if first > last:
                raise FeedError(f"{self.name}: depthUpdate: U={first} > u={last}")
            bids, asks = self._levels(msg["b"], "b"), self._levels(msg["a"], "a")
            event_us = ms_to_us(self.name, "E", msg["E"]) if "E" in msg else None
            symbol = self._symbol(msg["s"])
            return BookDelta(self.name, symbol, bids, asks, first, last, event_us=event_us)

    def depth_snapshot(self, symbol: str, body: Any) -> BookSnapshot:
        """A ``/api/v3/depth`` reply (as ``Http.get_json`` decodes it) for ``symbol``."""
        if type(body) is not dict:
            raise FeedError(f"{self.name} depth: expected an object, got {body!r:.60}")
        with missing_fields(self.name, "depth"):
            last = update_id(self.name, "lastUpdateId", body["lastUpdateId"])
            bids, asks = self._levels(body["bids"], "bids"), self._levels(body["asks"], "asks")
        return BookSnapshot(self.name, symbol, bids, asks, sequence=last)

    def _levels(self, rows: Any, field: str) -> tuple[Level, ...]:
        """[["price", "qty"], ...]"""
        if type(rows) is not list:
            raise FeedError(f"{self.name}: {field}: expected an array, got {rows!r:.60}")
        for row in rows:
            if type(row) is not list or len(row) != 2:
                raise FeedError(f"{self.name}: {field}[]: expected [price, qty], got {row!r:.60}")
        return tuple(level(self.name, field, price, qty) for price, qty in rows)

    def _trade(self, d: dict[str, Any], recv_us: int) -> Trade:
        # The hot path: one dict, then the codec's own checks (no second pass here).
        try:
            vs, m, t_ms = d["s"], d["m"], d["T"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name,
                "symbol": self._symbol(vs), "venue_symbol": vs,
                "trade_id": d["t"], "price": d["p"], "qty": d["q"],
                # m: "is the buyer the market maker?"; if so the taker sold.
                "side": "sell" if m is True else "buy" if m is False else self._bad_m(m),
                "event_us": t_ms * 1000 if type(t_ms) is int else ms_to_us(self.name, "T", t_ms),
                "recv_us": recv_us,
            }  # fmt: skip
        except KeyError as e:
            raise missing(self.name, "trade", e) from None
        return build(self.name, "trade", wire)

    def _quote(self, d: dict[str, Any], recv_us: int) -> Quote:
        # Spot bookTicker carries no time; futures-style payloads carry T and E.
        t_field = "T" if "T" in d else "E" if "E" in d else None
        try:
            vs = d["s"]
            wire = {
                "v": 1, "t": "quote", "venue": self.name,
                "symbol": self._symbol(vs),
                "venue_symbol": vs, "update_id": d["u"], "bid_price": d["b"],
                "bid_qty": d["B"], "ask_price": d["a"], "ask_qty": d["A"],
                "event_us": ms_to_us(self.name, t_field, d[t_field]) if t_field else recv_us,
                "recv_us": recv_us,
            }  # fmt: skip
        except KeyError as e:
            raise missing(self.name, "bookTicker", e) from None
        return build(self.name, "bookTicker", wire)

    def _symbol(self, vs: Any) -> str:
        if type(vs) is not str:
            raise FeedError(f"{self.name}: s: expected a symbol string, got {vs!r:.60}")
        canonical = self._canonical.get(vs)
        if canonical is not None:
            return canonical
        try:
            return self.to_canonical(vs)
        except ValueError as e:
            raise FeedError(f"{self.name}: s: {e}") from None

    def _bad_m(self, m: Any) -> str:
        raise FeedError(f"{self.name}: m: expected true or false, got {m!r:.60}")

    def _control(self, msg: dict[str, Any]) -> Parsed:
        if msg.get("e") == "serverShutdown":
            return Parsed(control="server_shutdown", detail=f"E={msg.get('E')}")
        if "error" in msg:
            err = msg["error"]
            detail = f"{err.get('code')}: {err.get('msg')}" if type(err) is dict else str(err)
            return Parsed(control="error", detail=f"id={msg.get('id')} {detail}"[:500])
        if "result" in msg and "id" in msg:
            return Parsed(control="ack", detail=f"id={msg['id']}")
        raise FeedError(f"{self.name}: unknown frame with keys {sorted(msg)[:10]}")


def _ms(venue: str, field: str, v: Any) -> int:
    if type(v) is not int:
        raise FeedError(f"{venue} rest: {field}: expected integer epoch ms, got {v!r:.60}")
    return v


def _ms_range(start_us: int, end_us: int) -> tuple[int, int]:
    """[start_us, end_us) as Binance's inclusive millisecond startTime/endTime."""
    return -(-start_us // 1000), -(-end_us // 1000) - 1


class BinanceRest:
    """Binance spot (or Binance US, or the simulator) market-data history.

    Limits: at most 1000 rows per request; each endpoint costs request weight
    (historicalTrades and trades are among the heaviest) against 6000 per minute per IP,
    which ``Http`` watches; an aggTrades time window must be shorter than one hour.
    """

    def __init__(self, config: VenueConfig | None = None, http: Http | None = None):
        self.venue = Binance(config)
        self.name = self.venue.config.name
        self.http = http or Http(self.venue.config.rest_url)

    def historical_trades(
        self, symbol: str, from_id: int | None = None, limit: int = 1000
    ) -> list[Trade]:
        """``/api/v3/historicalTrades``: up to ``limit`` trades from id ``from_id`` on."""
        rows = self._get("/api/v3/historicalTrades", symbol, fromId=from_id, limit=limit)
        return [self._trade(symbol, r) for r in rows]

    def recent_trades(self, symbol: str, limit: int = 1000) -> list[Trade]:
        """``/api/v3/trades``: the newest ``limit`` trades."""
        return [self._trade(symbol, r) for r in self._get("/api/v3/trades", symbol, limit=limit)]

    def agg_trades(
        self, symbol: str, start_us: int, end_us: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """``/api/v3/aggTrades`` rows (one per taker order; ``f``..``l`` are its trade ids)
        with time in [start_us, end_us), a window under one hour."""
        start_ms, end_ms = _ms_range(start_us, end_us)
        return self._get(
            "/api/v3/aggTrades", symbol, startTime=start_ms, endTime=end_ms, limit=limit
        )

    def trades_by_id(
        self,
        symbol: str,
        from_id: int,
        to_id: int | None,
        start_us: int | None = None,
        end_us: int | None = None,
    ) -> Iterator[Trade]:
        """Exactly the trades with id in [from_id, to_id] (to the newest without
        ``to_id``), in order, paged by id (the time bounds are not needed). Binance ids
        are contiguous per symbol, so a page that skips one raises RestError, never a hole."""
        return contiguous(
            self.name, symbol, from_id, to_id,
            lambda nxt, n: self.historical_trades(symbol, nxt, min(1000, n)),
        )  # fmt: skip

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterator[Trade]:
        """Every trade with start_us <= time < end_us, in id order: aggTrades finds the
        first trade id (one request per hour-long window until a trade shows up), then
        historicalTrades pages on from it."""
        next_id: int | None = None
        window = start_us
        while next_id is None and window < end_us:
            window_end = min(end_us, window + HOUR_US)
            rows = self.agg_trades(symbol, window, window_end, limit=1)
            if rows:
                first = rows[0].get("f") if type(rows[0]) is dict else None
                if type(first) is not int:
                    raise FeedError(
                        f"{self.name} rest aggTrades: no first trade id: {rows[0]!r:.100}"
                    )
                next_id = first
            window = window_end
        page = partial(self.historical_trades, symbol)
        yield from by_id_from(next_id, page, 1000, start_us, end_us)

    def klines(self, symbol: str, interval: str, start_us: int, end_us: int) -> Iterator[Candle]:
        """``/api/v3/klines``: venue candles opening in [start_us, end_us), source 'venue';
        VWAP = quote volume / volume, 0 when nothing traded."""
        start_ms, end_ms = _ms_range(start_us, end_us)
        while start_ms <= end_ms:
            rows = self._get(
                "/api/v3/klines", symbol, interval=interval, startTime=start_ms,
                endTime=end_ms, limit=1000,
            )  # fmt: skip
            for row in rows:
                yield self._candle(symbol, interval, row)
            if len(rows) < 1000:
                return
            start_ms = rows[-1][0] + 1

    def depth(self, symbol: str, levels: int) -> BookSnapshot:
        """``/api/v3/depth``: the book's snapshot with at least ``levels`` a side (the
        smallest limit Binance accepts that holds them; at most 5000)."""
        limit = next((n for n in DEPTH_LIMITS if n >= levels), DEPTH_LIMITS[-1])
        body = self.http.get_json(
            "/api/v3/depth", {"symbol": self.venue.to_venue_symbol(symbol), "limit": limit}
        )
        return self.venue.depth_snapshot(symbol, body)

    def _get(self, path: str, symbol: str, **params: Any) -> list[Any]:
        rows = self.http.get_json(path, {"symbol": self.venue.to_venue_symbol(symbol), **params})
        if type(rows) is not list:
            raise RestError(f"{self.name} {path}: expected an array, got {str(rows)[:200]}")
        return rows

    def _trade(self, symbol: str, r: Any) -> Trade:
        with bad_rows(self.name, "rest trade", r):
            maker = r["isBuyerMaker"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": self.venue.to_venue_symbol(symbol), "trade_id": r["id"],
                "price": r["price"], "qty": r["qty"],
                # isBuyerMaker: the taker sold.
                "side": "sell" if maker is True else "buy" if maker is False else maker,
                "event_us": _ms(self.name, "time", r["time"]) * 1000,
                "recv_us": now_us(self.http),
            }  # fmt: skip
        return build(self.name, "rest trade", wire)

    def _candle(self, symbol: str, interval: str, row: Any) -> Candle:
        """[open time, o, h, l, c, volume, close time, quote volume, trades, ...]"""
        with bad_rows(self.name, "rest kline", row):
            volume, quote_volume = Decimal(row[5]), Decimal(row[7])
            vwap = _VWAP.divide(quote_volume, volume) if volume > 0 else Decimal(0)
            wire = {
                "v": 1, "t": "candle", "venue": self.name, "symbol": symbol,
                "interval": interval, "open_us": _ms(self.name, "open time", row[0]) * 1000,
                "open": row[1], "high": row[2], "low": row[3], "close": row[4],
                "volume": row[5], "trade_count": row[8], "vwap": str(vwap), "source": "venue",
            }  # fmt: skip
        return build(self.name, "rest kline", wire)


SPECS = tuple(
    VenueSpec(
        name, config, Binance, BinanceRest, sequential_ids=True, klines=True, book_sync="binance"
    )
    for name, config in CONFIGS.items()
)
