"""Venue REST history, for backfill and for repairing gaps after a reconnect.

Standard library only (urllib). ``Http`` is the one place that knows how to be a polite
client: it paces requests, slows down when Binance's used-weight header nears the limit,
honours 429/418 ``Retry-After``, retries 5xx, timeouts and dropped connections with
exponential backoff and full jitter, and raises ``RestError`` after ``attempts`` tries.
Every client takes its base URL from ``VenueConfig.rest_url``, so the same code talks to
the venue or to the local simulator. Rows become events through the same adapters and
codec checks as the WebSocket frames; a row that fails them raises ``FeedError``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Context, Decimal
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

from tasks.events import Candle, Trade
from tasks.feeds.base import FeedError, VenueConfig
from tasks.feeds.binance import Binance
from tasks.feeds.coinbase import Coinbase, taker_side, trade_id
from tasks.feeds.common import build, decimal_text, rfc3339_to_us
from tasks.feeds.kraken import REST_ASSETS, Kraken

HOUR_US = 3_600_000_000
_VWAP = Context(prec=28)


class RestError(Exception):
    """A request that failed for good; ``status`` is the last HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Http:
    """GET JSON from one base URL, politely. ``sleep`` and ``clock`` are injectable so
    tests can watch the waits without waiting."""

    base_url: str
    timeout_s: float = 10.0
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0  # a longer ban (418) fails now rather than hanging
    min_interval_s: float = 0.0
    weight_limit: int = 6000  # Binance spot request weight per minute
    weight_slowdown: float = 0.9  # at 90% of it, wait for the next minute
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    _next_at: float = field(default=0.0, init=False)

    def get_json(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        retry_on: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """The decoded body (decimals exact). ``retry_on`` names an application-level
        error worth retrying (e.g. Kraken's rate limit, sent with HTTP 200)."""
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = self.base_url.rstrip("/") + path + (f"?{query}" if query else "")
        last, status = "", None
        for attempt in range(self.attempts):
            self._pace()
            try:
                request = Request(url, headers={"Accept": "application/json"})
                with urlopen(request, timeout=self.timeout_s) as resp:
                    body = resp.read()
                    self._watch_weight(resp.headers)
                data = _json(url, body)
                last = retry_on(data) if retry_on else None
                if not last:
                    return data
                delay = self._backoff(attempt)
            except HTTPError as e:
                status, detail = e.code, e.read()[:300].decode(errors="replace")
                self._watch_weight(e.headers)
                last = f"HTTP {e.code}: {detail}"
                if e.code in (418, 429):
                    delay = self._retry_after(e.headers.get("Retry-After"), attempt)
                    if delay > self.max_retry_after_s:
                        raise RestError(
                            f"GET {url}: {last}; retry after {delay:.0f} s", e.code
                        ) from None
                elif e.code < 500:
                    raise RestError(f"GET {url}: {last}", e.code) from None
                else:
                    delay = self._backoff(attempt)
            except (URLError, TimeoutError, ConnectionError, HTTPException) as e:
                last, delay = (
                    f"{type(e).__name__}: {getattr(e, 'reason', e)}",
                    self._backoff(attempt),
                )
            if attempt + 1 < self.attempts:
                self.sleep(delay)
        raise RestError(f"GET {url}: gave up after {self.attempts} attempts; last: {last}", status)

    def _pace(self) -> None:
        wait = self._next_at - self.clock()
        if wait > 0:
            self.sleep(wait)
        self._next_at = max(self._next_at, self.clock() + self.min_interval_s)

    def _watch_weight(self, headers: Any) -> None:
        used = headers.get("X-MBX-USED-WEIGHT-1m") if headers else None
        if used and used.isdigit() and int(used) >= self.weight_limit * self.weight_slowdown:
            now = self.clock()
            self._next_at = max(self._next_at, now - now % 60 + 60.5)  # weight resets each minute

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))

    def _retry_after(self, value: str | None, attempt: int) -> float:
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                try:
                    return max(0.0, parsedate_to_datetime(value).timestamp() - self.clock())
                except (TypeError, ValueError):
                    pass
        return self._backoff(attempt)


def _json(url: str, body: bytes) -> Any:
    try:
        return json.loads(body, parse_float=Decimal)
    except ValueError as e:
        raise RestError(f"GET {url}: not JSON: {e}") from None


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

    def trades_by_id(self, symbol: str, from_id: int, to_id: int) -> Iterator[Trade]:
        """Exactly the trades with id in [from_id, to_id], in order. Binance ids are
        contiguous per symbol, so a page that skips one raises RestError, never a hole."""
        next_id = from_id
        while next_id <= to_id:
            page = self.historical_trades(symbol, next_id, min(1000, to_id - next_id + 1))
            if not page:
                raise RestError(f"{self.name} {symbol}: no trades from id {next_id} (to {to_id})")
            for t in page:
                if t.trade_id < next_id:
                    continue
                if t.trade_id > to_id:
                    return
                if t.trade_id != next_id:
                    raise RestError(f"{self.name} {symbol}: ids jump {next_id} -> {t.trade_id}")
                yield t
                next_id += 1

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
        while next_id is not None:
            page = self.historical_trades(symbol, next_id)
            for t in page:
                if t.event_us >= end_us:
                    return
                if t.event_us >= start_us:
                    yield t
            next_id = page[-1].trade_id + 1 if len(page) == 1000 else None

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

    def _get(self, path: str, symbol: str, **params: Any) -> list[Any]:
        rows = self.http.get_json(path, {"symbol": self.venue.to_venue_symbol(symbol), **params})
        if type(rows) is not list:
            raise RestError(f"{self.name} {path}: expected an array, got {str(rows)[:200]}")
        return rows

    def _trade(self, symbol: str, r: Any) -> Trade:
        try:
            maker = r["isBuyerMaker"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": self.venue.to_venue_symbol(symbol), "trade_id": r["id"],
                "price": r["price"], "qty": r["qty"],
                # isBuyerMaker: the taker sold.
                "side": "sell" if maker is True else "buy" if maker is False else maker,
                "event_us": _ms(self.name, "time", r["time"]) * 1000,
                "recv_us": _now_us(self.http),
            }  # fmt: skip
        except (KeyError, TypeError) as e:
            raise FeedError(f"{self.name} rest trade: bad row ({e!r}): {r!r:.200}") from None
        return build(self.name, "rest trade", wire)

    def _candle(self, symbol: str, interval: str, row: Any) -> Candle:
        """[open time, o, h, l, c, volume, close time, quote volume, trades, ...]"""
        try:
            volume, quote_volume = Decimal(row[5]), Decimal(row[7])
            vwap = _VWAP.divide(quote_volume, volume) if volume > 0 else Decimal(0)
            wire = {
                "v": 1, "t": "candle", "venue": self.name, "symbol": symbol,
                "interval": interval, "open_us": _ms(self.name, "open time", row[0]) * 1000,
                "open": row[1], "high": row[2], "low": row[3], "close": row[4],
                "volume": row[5], "trade_count": row[8], "vwap": str(vwap), "source": "venue",
            }  # fmt: skip
        except FeedError:
            raise
        except (IndexError, KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise FeedError(f"{self.name} rest kline: bad row ({e!r}): {row!r:.200}") from None
        return build(self.name, "rest kline", wire)


class CoinbaseRest:
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
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=0.1)

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
        try:
            product = r["product_id"]
            wire = {
                "v": 1, "t": "trade", "venue": self.name,
                "symbol": self.venue.to_canonical(product), "venue_symbol": product,
                "trade_id": trade_id(self.name, r["trade_id"]),
                "price": decimal_text(self.name, "price", r["price"]),
                "qty": decimal_text(self.name, "size", r["size"]),
                "side": taker_side(self.name, r["side"]),
                "event_us": rfc3339_to_us(self.name, "time", r["time"]),
                "recv_us": _now_us(self.http),
            }  # fmt: skip
        except FeedError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise FeedError(f"{self.name} rest trade: bad row ({e!r}): {r!r:.200}") from None
        return build(self.name, "rest trade", wire)


class KrakenRest:
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
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=1.0)

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
        try:
            price, volume, when, side, _kind, _misc, tid = row[:7]
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": self.venue.to_venue_symbol(symbol), "trade_id": tid,
                "price": decimal_text(self.name, "price", price),
                "qty": decimal_text(self.name, "volume", volume),
                "side": {"b": "buy", "s": "sell"}.get(side, side),
                "event_us": int(Decimal(decimal_text(self.name, "time", when)) * 1_000_000),
                "recv_us": _now_us(self.http),
            }  # fmt: skip
        except FeedError:
            raise
        except (ValueError, TypeError, ArithmeticError) as e:
            raise FeedError(f"{self.name} rest trade: bad row ({e!r}): {row!r:.200}") from None
        return build(self.name, "rest trade", wire)


def _now_us(http: Http) -> int:
    return int(http.clock() * 1_000_000)
