"""Binance spot (and Binance US: same protocol, other hosts) combined streams.

Streams ``<symbol>@trade`` and ``<symbol>@bookTicker`` are subscribed in the URL
(``/stream?streams=a/b/c``), at most ``max_streams_per_connection`` (1024) per
connection; ``shards`` splits a symbol list accordingly. ``subscription_frames`` gives
the SUBSCRIBE/UNSUBSCRIBE JSON frames for live changes; Binance allows 5 incoming
messages per second per connection, which the caller paces at
``config.subscribe_rate_per_s``.

Frames arrive as ``{"stream": ..., "data": {...}}`` envelopes (or raw payloads on
``/ws``). Times are epoch milliseconds, scaled to microseconds.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.events import Quote, Trade
from tasks.feeds.base import FeedError, Parsed, VenueConfig
from tasks.feeds.common import build, loads, ms_to_us, shard, split_concatenated

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
STREAMS: dict[str, str] = {"trades": "trade", "quotes": "bookTicker"}


def default_config(name: str) -> VenueConfig:
    """The public endpoints of 'binance' or 'binanceus'."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"not a Binance venue: {name!r}; known: {sorted(CONFIGS)}") from None


class Binance:
    """Venue adapter for Binance-protocol spot streams; pure (no sockets, no clock)."""

    channels = ("trades", "quotes")

    def __init__(self, config: VenueConfig | None = None):
        self.config = config or CONFIGS["binance"]
        self.name = self.config.name
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

    def shards(
        self, symbols: list[str], channels: list[str], shard_size: int | None = None
    ) -> list[list[str]]:
        """Symbols per connection: each carries at most max_streams_per_connection streams
        (and at most ``shard_size`` symbols when given)."""
        return shard(symbols, len(channels), self.config.max_streams_per_connection, shard_size)

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
        if "u" in msg and (e is None or e == "bookTicker"):
            return Parsed([self._quote(msg, recv_us)])
        return self._control(msg)

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
        except KeyError as k:
            raise FeedError(f"{self.name} trade: missing field {k}") from None
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
        except KeyError as k:
            raise FeedError(f"{self.name} bookTicker: missing field {k}") from None
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
