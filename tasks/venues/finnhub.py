"""Finnhub over WebSocket: trades of US stocks, crypto and forex (the free plan's stream).

Connection: ``wss://ws.finnhub.io?token=<API token>``. The token is a secret that rides in
the URL, so it lives only in ``VenueConfig.credential`` (out of repr), is added to the URL
by ``connection_url`` alone, and every error text the connection logs is redacted
(``tasks.venues.base.redact``); REST sends it as the ``X-Finnhub-Token`` header instead of
a query parameter, so no URL the REST client quotes in an error carries it. It is read
from ``TAPELINE_FINNHUB_TOKEN`` or the Prefect Secret block ``finnhub-token``
(``blocks.venue_credential``), never from a file; the simulator accepts its own token.

Frames: ``{"type":"subscribe","symbol":"AAPL"}`` per symbol (``unsubscribe`` likewise);
the venue sends ``{"type":"trade","data":[{"p":7296.89,"s":"BINANCE:BTCUSDT",
"t":1575526691134,"v":0.011467,"c":["1","12"]}]}`` (price and volume JSON numbers, read
exactly by ``loads``; ``t`` epoch ms; ``c`` trade conditions, absent or null for crypto),
``{"type":"ping"}`` about every minute, and ``{"type":"error","msg":"..."}``. There are no
quotes on the free stream: ``channels`` is trades only.

Side: Finnhub does not say who took liquidity, so every trade's side is "unknown"
(``tasks.core.events.TRADE_SIDES``), never a guess.

Trade ids and duplicates: Finnhub's trades have no id, so the Trade's ``trade_id`` is a
dedupe key: the first 63 bits of BLAKE2b over (venue symbol, ``t``, ``p``, ``v``, sorted
conditions), numbers taken by value (``7296.890`` and ``7296.89`` are one price). A trade
the venue sends twice, a frame replayed after a reconnect and a trade published again
after a Kafka failure therefore carry the same key, and the sinks, which key trades by
(venue, symbol, trade_id), store it once. What it cannot tell apart: two genuinely
separate prints of one symbol with the same price, size and conditions in the same
millisecond collapse into one row (Finnhub gives nothing else to tell them by). Two
different trades sharing a key by chance is a birthday collision in 2**63 per symbol:
about n**2 / 2**64 for n trades of one symbol, 1 in 100,000 at 14 million trades and 1 in
1,800 at 100 million; the later one would be taken for a duplicate. Without ids the
platform cannot see or repair holes either (``sequential_ids=False``): a trade Finnhub
never sent, or sent while the socket was down, is not recovered.

Symbols: the platform's canonical form is BASE-QUOTE (``tasks.core.params``). A plain
ticker is a US stock quoted in USD; an ``EXCHANGE:PAIR`` symbol keeps its exchange as a
suffix of the quote part (as Deribit's instrument kind), so every name round-trips::

    AAPL               <-> AAPL-USD              (US stock; class shares like BRK.B refused)
    BINANCE:BTCUSDT    <-> BTC-USDTBINANCE       (pair split by known quote assets)
    COINBASE:BTC-USD   <-> BTC-USDCOINBASE
    OANDA:EUR_USD      <-> EUR-USDOANDA          (forex)
    FXCM:EUR/USD       <-> EUR-USDFXCM

A quote of exactly USD is always a stock; any other exchange, or a pair that cannot be
split, is refused with ValueError (add the exchange to ``EXCHANGES`` to take it).

Quiet markets: US stocks trade 09:30-16:00 America/New_York on weekdays and are silent
outside those hours, but the socket still carries Finnhub's pings, which the connection
counts as traffic; the watchdog's timeout for this venue is at least
``STALL_TIMEOUT_S`` (``VenueSpec.min_stall_timeout_s``), longer than the ping interval.

REST (``FinnhubRest``): ``/api/v1/{stock,crypto,forex}/candle`` serve candles (``klines``;
no VWAP and no trade count in them: both are stored as 0, meaning "not reported"), paced
at one call a second for the free plan's 60 calls a minute, 429 answered by ``Http``'s
backoff. Finnhub serves no trade history on the free plan: ``trade_history=False``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from hashlib import blake2b
from typing import Any
from urllib.parse import urlencode

from tasks.core.codec import MAX_DECIMAL_CHARS, MAX_ID
from tasks.core.events import Candle, Trade
from tasks.venues.base import FeedError, Parsed, VenueConfig, VenueSpec, redact
from tasks.venues.http import Http, RestError
from tasks.venues.parsing import (
    Adapter,
    bad_rows,
    build,
    decimal_text,
    loads,
    missing_fields,
    ms_to_us,
    split_concatenated,
)

# The free plan: at most 50 symbols on the one stream a key may open.
CONFIG = VenueConfig(
    "finnhub", "wss://ws.finnhub.io", "https://finnhub.io", max_streams_per_connection=50
)
CREDENTIAL = "finnhub-token"  # TAPELINE_FINNHUB_TOKEN, or a Prefect Secret block of this name
SIMULATOR_TOKEN = "tapeline-simulator"  # what the local simulator accepts (not a secret)
TOKEN_HEADER = "X-Finnhub-Token"
REST_INTERVAL_S = 1.0  # 60 API calls a minute on the free plan
STALL_TIMEOUT_S = 180.0  # pings come every one to two minutes
SIDE = "unknown"
STOCK_QUOTE = "USD"
# Exchange -> (pair separator, "" for concatenated pairs; candle endpoint).
EXCHANGES: dict[str, tuple[str, str]] = {
    "BINANCE": ("", "crypto"),
    "COINBASE": ("-", "crypto"),
    "OANDA": ("_", "forex"),
    "FXCM": ("/", "forex"),
}
_BY_LENGTH = sorted(EXCHANGES, key=len, reverse=True)
# Quote assets of concatenated pairs, longest first (see parsing.split_concatenated).
QUOTES = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "USD")
RESOLUTIONS = {"1m": "1", "5m": "5", "15m": "15", "30m": "30", "1h": "60", "1d": "D"}
_ASSET = re.compile(r"[A-Z0-9]{1,24}")
_TICKER = re.compile(r"[A-Z][A-Z0-9]{0,23}")


def dedupe_key(venue_symbol: str, t: int, price: str, qty: str, conditions: tuple[str, ...]) -> int:
    """The Trade's ``trade_id`` for a venue without ids: 63 bits of BLAKE2b over the
    trade's content, numbers by value. See the module docstring for what it cannot tell
    apart."""
    text = "\x1f".join(
        (venue_symbol, str(t), _by_value(price), _by_value(qty), "\x1e".join(sorted(conditions)))
    )
    digest = blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_ID


def _by_value(text: str) -> str:
    """A decimal's text with trailing zeros gone (``7296.890`` -> ``729689e-2``), exactly
    (no context rounding); text that is not a finite number stays as it is (the codec
    refuses it anyway)."""
    if len(text) > MAX_DECIMAL_CHARS:
        return text
    try:
        d = Decimal(text)
    except InvalidOperation:
        return text
    if not d.is_finite():
        return text
    sign, digits, exponent = d.as_tuple()
    coefficient = int("".join(map(str, digits)))
    if coefficient == 0:
        return "0"
    while coefficient % 10 == 0:
        coefficient //= 10
        exponent += 1  # type: ignore[operator]
    return f"{'-' if sign else ''}{coefficient}e{exponent}"


def _conditions(venue: str, c: Any) -> tuple[str, ...]:
    """Trade conditions: absent or null is none; else a list of strings (or integers)."""
    if c is None:
        return ()
    if type(c) is not list or any(type(x) not in (str, int) for x in c):
        raise FeedError(f"{venue}: c: expected a list of trade conditions, got {c!r:.60}")
    return tuple(str(x) for x in c)


class Finnhub(Adapter):
    """Venue adapter for Finnhub's WebSocket trades; pure (no sockets, no clock)."""

    channels = ("trades",)
    symbol_field = "s"
    symbol_kind = "Finnhub symbol"

    def __init__(self, config: VenueConfig | None = None):
        super().__init__(config or CONFIG)
        # venue symbol -> canonical, for names asked for (a concatenated pair may split
        # more than one way; the subscribed spelling wins)
        self._names: dict[str, str] = {}

    def to_venue_symbol(self, symbol: str) -> str:
        canonical = symbol.upper()
        base, dash, quote = canonical.partition("-")
        if not dash or not _ASSET.fullmatch(base) or not _ASSET.fullmatch(quote):
            raise ValueError(f"not a canonical symbol: {symbol!r:.40}")
        if quote == STOCK_QUOTE:
            if not _TICKER.fullmatch(base):
                raise ValueError(f"not a US stock ticker: {symbol!r:.40}")
            name = base
        else:
            exchange = next(
                (e for e in _BY_LENGTH if quote.endswith(e) and len(quote) > len(e)), None
            )
            if exchange is None:
                raise ValueError(
                    f"not a Finnhub symbol: {symbol!r:.40} (stocks are TICKER-USD; crypto and"
                    f" forex BASE-QUOTE<EXCHANGE>, exchanges: {', '.join(EXCHANGES)})"
                )
            sep = EXCHANGES[exchange][0]
            name = f"{exchange}:{base}{sep}{quote[: -len(exchange)]}"
        self._names[name] = canonical
        return name

    def to_canonical(self, venue_symbol: str) -> str:
        known = self._names.get(venue_symbol)
        if known is not None:
            return known
        exchange, colon, pair = venue_symbol.partition(":")
        if not colon:
            if not _TICKER.fullmatch(venue_symbol):
                raise ValueError(f"not a Finnhub symbol: {venue_symbol!r:.40}")
            return f"{venue_symbol}-{STOCK_QUOTE}"
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange {exchange!r:.20} is not mapped ({', '.join(EXCHANGES)})")
        sep = EXCHANGES[exchange][0]
        if sep:
            base, found, quote = pair.partition(sep)
            if not found or sep in quote:
                raise ValueError(f"not a {exchange} pair: {pair!r:.40}")
        else:
            base, quote = split_concatenated(pair, QUOTES)
        symbol = f"{base}-{quote}{exchange}"
        if not _ASSET.fullmatch(base) or not _ASSET.fullmatch(quote + exchange):
            raise ValueError(f"not a Finnhub symbol: {venue_symbol!r:.40}")
        return symbol

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        """The stream's URL; it carries the token, so it must never be logged."""
        if not self.config.credential:
            raise ValueError(
                f"{self.name} needs an API token: set TAPELINE_FINNHUB_TOKEN or save a"
                f" Prefect Secret block named {CREDENTIAL!r}"
            )
        return f"{self.config.ws_url}?{urlencode({'token': self.config.credential})}"

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """One subscribe frame per symbol (the caller paces them)."""
        for c in channels:
            if c not in self.channels:
                raise ValueError(f"{self.name}: unknown channel {c!r} (trades only)")
        return [
            json.dumps({"type": "subscribe", "symbol": self.to_venue_symbol(s)}) for s in symbols
        ]

    def unsubscribe_frames(self, symbols: list[str]) -> list[str]:
        return [
            json.dumps({"type": "unsubscribe", "symbol": self.to_venue_symbol(s)}) for s in symbols
        ]

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        kind = msg.get("type")
        if kind == "trade":
            data = msg.get("data")
            if type(data) is not list:
                raise FeedError(f"{self.name}: data: expected an array, got {data!r:.60}")
            return Parsed([self._trade(d, recv_us) for d in data])
        if kind == "ping":
            return Parsed(control="heartbeat", detail="ping")
        if kind == "error":
            detail = redact(f"{msg.get('msg')}", self.config.credential)
            return Parsed(control="error", detail=detail[:500])
        raise FeedError(f"{self.name}: unknown frame type {kind!r:.40}")

    def _trade(self, d: Any, recv_us: int) -> Trade:
        if type(d) is not dict:
            raise FeedError(f"{self.name}: data[]: expected an object, got {d!r:.60}")
        with missing_fields(self.name, "trade"):
            name, t = d["s"], d["t"]
            if type(name) is not str:
                raise FeedError(f"{self.name}: s: expected a symbol, got {name!r:.60}")
            symbol = self._symbol(name)
            event_us = ms_to_us(self.name, "t", t)
            price, qty = self._dec(d, "p"), self._dec(d, "v")
            key = dedupe_key(name, t, price, qty, _conditions(self.name, d.get("c")))
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": name, "trade_id": key, "price": price, "qty": qty,
                "side": SIDE, "event_us": event_us, "recv_us": recv_us,
            }  # fmt: skip
        return build(self.name, "trade", wire)


class FinnhubRest:
    """Finnhub candles over REST (``klines``), for ``backfill_candles``.

    ``GET /api/v1/<stock|crypto|forex>/candle?symbol=&resolution=&from=&to=`` (UNIX
    seconds, both inclusive) answers ``{"c":[..],"h":[..],"l":[..],"o":[..],"t":[..],
    "v":[..],"s":"ok"}`` or ``{"s":"no_data"}``. The token goes in the ``X-Finnhub-Token``
    header. Trades by time are not served on the free plan.
    """

    def __init__(self, config: VenueConfig | None = None, http: Http | None = None):
        self.venue = Finnhub(config)
        self.name = self.venue.config.name
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=REST_INTERVAL_S)

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterator[Trade]:
        raise RestError(
            f"{self.name}: no trade history over REST on the free plan; backfill candles"
            " instead (backfill_candles)"
        )

    def klines(self, symbol: str, interval: str, start_us: int, end_us: int) -> Iterator[Candle]:
        """Candles opening in [start_us, end_us), oldest first, source 'venue'."""
        resolution = RESOLUTIONS.get(interval)
        if resolution is None:
            raise ValueError(
                f"{self.name} serves candles of {', '.join(RESOLUTIONS)}, not {interval!r}"
            )
        name = self.venue.to_venue_symbol(symbol)
        exchange, colon, _ = name.partition(":")
        kind = EXCHANGES[exchange][1] if colon else "stock"
        if not self.venue.config.credential:
            raise RestError(f"{self.name}: no API token (TAPELINE_FINNHUB_TOKEN)")
        params = {
            "symbol": name, "resolution": resolution,
            "from": start_us // 1_000_000, "to": (end_us - 1) // 1_000_000,
        }  # fmt: skip
        path = f"/api/v1/{kind}/candle"
        body = self.http.get_json(
            path, params, headers={TOKEN_HEADER: self.venue.config.credential}
        )
        status = body.get("s") if type(body) is dict else None
        if status == "no_data":
            return
        if status != "ok":
            raise RestError(f"{self.name} {path} {name}: {str(body)[:200]}")
        with bad_rows(self.name, "rest candles", body):
            columns = [body[k] for k in ("t", "o", "h", "l", "c", "v")]
            if len({len(col) for col in columns}) != 1:
                raise ValueError("columns of different lengths")
            rows = list(zip(*columns, strict=True))
        for row in rows:
            candle = self._candle(symbol, interval, row)
            if start_us <= candle.open_us < end_us:
                yield candle

    def _candle(self, symbol: str, interval: str, row: Any) -> Candle:
        with bad_rows(self.name, "rest candle", row):
            t, o, h, low, c, v = row
            if type(t) is not int:
                raise ValueError(f"t: expected integer epoch seconds, got {t!r:.40}")
            dec = [
                decimal_text(self.name, f, x)
                for f, x in zip("ohlcv", (o, h, low, c, v), strict=True)
            ]
            wire = {
                "v": 1, "t": "candle", "venue": self.name, "symbol": symbol,
                "interval": interval, "open_us": t * 1_000_000, "open": dec[0],
                "high": dec[1], "low": dec[2], "close": dec[3], "volume": dec[4],
                "trade_count": 0, "vwap": "0", "source": "venue",
            }  # fmt: skip
        return build(self.name, "rest candle", wire)


SPEC = VenueSpec(
    "finnhub", CONFIG, Finnhub, FinnhubRest, rest_interval_s=REST_INTERVAL_S,
    simulator_ws_path="/finnhub", sequential_ids=False, klines=True, trade_history=False,
    credential=CREDENTIAL, simulator_credential=SIMULATOR_TOKEN,
    min_stall_timeout_s=STALL_TIMEOUT_S,
)  # fmt: skip
