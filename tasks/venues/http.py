"""The one polite HTTP client every venue's REST history uses.

Standard library only (urllib). ``Http`` paces requests, slows down when Binance's
used-weight header nears the limit, honours 429/418 ``Retry-After``, retries 5xx,
timeouts and dropped connections with exponential backoff and full jitter, and raises
``RestError`` after ``attempts`` tries. Every venue's REST client takes its base URL from
``VenueConfig.rest_url``, so the same code talks to the venue or to the local simulator;
rows become events through the same adapters and codec checks as WebSocket frames.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

HOUR_US = 3_600_000_000


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
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The decoded body (decimals exact). ``retry_on`` names an application-level
        error worth retrying (e.g. Kraken's rate limit, sent with HTTP 200). ``headers``
        carry a credential (e.g. Finnhub's ``X-Finnhub-Token``) so that it is never part
        of the URL, which error messages quote."""
        query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = self.base_url.rstrip("/") + path + (f"?{query}" if query else "")
        last, status = "", None
        for attempt in range(self.attempts):
            self._pace()
            try:
                request = Request(url, headers={"Accept": "application/json", **(headers or {})})
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


def now_us(http: Http) -> int:
    return int(http.clock() * 1_000_000)


def contiguous(
    venue: str,
    symbol: str,
    from_id: int,
    to_id: int | None,
    page: Callable[[int, int], list[Any]],
    unit: str = "id",
    page_size: int = 1000,
) -> Iterator[Any]:
    """Exactly the trades with ``unit`` in [from_id, to_id] (to the newest when ``to_id``
    is None: until a page comes back short), in order, paged by ``page(next_id, count)``.
    For venues whose ids (Binance) or sequence numbers (Deribit) are contiguous per
    symbol: a page that skips one raises RestError, never a silent hole."""
    next_id = from_id
    while to_id is None or next_id <= to_id:
        count = page_size if to_id is None else to_id - next_id + 1
        rows = page(next_id, count)
        if not rows:
            if to_id is None:
                return
            raise RestError(f"{venue} {symbol}: no trades from {unit} {next_id} (to {to_id})")
        for t in rows:
            if t.trade_id < next_id:
                continue
            if to_id is not None and t.trade_id > to_id:
                return
            if t.trade_id != next_id:
                raise RestError(f"{venue} {symbol}: {unit} jumps {next_id} -> {t.trade_id}")
            yield t
            next_id += 1
        if to_id is None and len(rows) < count:
            return


# How far past the caller's bounds a by-time window reaches, for a REST that stamps a trade
# a little differently from the stream (Kraken's REST gives seconds to four decimals, its
# stream microseconds). Before the start it costs only older trades, skipped by id; after
# the end it is kept short, as a REST paged forward (Kraken) reads on until it sees a
# trade past the window.
SLACK_BEFORE_US = 1_000_000
SLACK_AFTER_US = 1_000


def contiguous_by_time(
    venue: str,
    symbol: str,
    from_id: int,
    to_id: int | None,
    by_time: Callable[[int, int], Iterable[Any]],
    start_us: int | None,
    end_us: int,
) -> list[Any]:
    """Exactly the trades with id in [from_id, to_id] (to the newest the history holds
    when ``to_id`` is None), in id order, from REST history that pages by time only
    (Coinbase, Kraken), for venues whose trade ids are contiguous per symbol.

    The caller knows when those trades happened: not before ``start_us`` (the time of the
    trade before ``from_id``) and not after ``end_us`` (the time of the trade after
    ``to_id``, or now), both inclusive, as neighbours may share a millisecond (a second,
    in Coinbase's REST). ``by_time(start, end)`` (the half-open [start, end)) is read
    over that window, widened by ``SLACK_BEFORE_US`` and ``SLACK_AFTER_US``, and the
    trades are then picked by id. All or nothing: an id the window does not hold raises
    RestError before any trade is returned, never a silent hole.
    """
    if start_us is None:
        raise RestError(
            f"{venue} {symbol}: its REST pages by time, so repairing from id {from_id} "
            "needs the time of the trade before it"
        )
    found: dict[int, Any] = {}
    for t in by_time(start_us - SLACK_BEFORE_US, end_us + SLACK_AFTER_US + 1):
        if t.trade_id >= from_id and (to_id is None or t.trade_id <= to_id):
            found[t.trade_id] = t
    last = max(found, default=from_id - 1) if to_id is None else to_id
    if len(found) < last - from_id + 1:
        hole = next(i for i in range(from_id, last + 1) if i not in found)
        raise RestError(
            f"{venue} {symbol}: {last - from_id + 1 - len(found)} of ids {from_id}..{last} "
            f"missing from history between {start_us} and {end_us} us (first: {hole})"
        )
    return [found[i] for i in range(from_id, last + 1)]


class IdsByTime:
    """``trades_by_id`` for a REST client whose history pages by time only (Coinbase,
    Kraken) of a venue whose trade ids are contiguous per symbol: read by time between
    ``start_us`` (required) and ``end_us`` (default now), both inclusive, then picked by
    id (``contiguous_by_time``); a missing id raises RestError, never a silent hole. The
    client provides ``name``, ``http`` and ``trades_by_time``."""

    name: str
    http: Http

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterable[Any]:
        raise NotImplementedError

    def trades_by_id(
        self,
        symbol: str,
        from_id: int,
        to_id: int | None,
        start_us: int | None = None,
        end_us: int | None = None,
    ) -> list[Any]:
        """Exactly the trades with id in [from_id, to_id] (to the newest without
        ``to_id``), in id order, for gap repair."""
        end = now_us(self.http) if end_us is None else end_us

        def by_time(start: int, stop: int) -> Iterable[Any]:
            return self.trades_by_time(symbol, start, stop)

        return contiguous_by_time(self.name, symbol, from_id, to_id, by_time, start_us, end)


def by_id_from(
    first_id: int | None,
    page: Callable[[int], list[Any]],
    page_size: int,
    start_us: int,
    end_us: int,
) -> Iterator[Any]:
    """The trades with start_us <= time < end_us, from ``first_id`` (the first one in the
    range, found by a time query) on, paged by id with ``page(next_id)``: a millisecond
    holding more trades than a page is never split or repeated. A page shorter than
    ``page_size`` is the last."""
    next_id = first_id
    while next_id is not None:
        rows = page(next_id)
        for t in rows:
            if t.event_us >= end_us:
                return
            if t.event_us >= start_us:
                yield t
        next_id = rows[-1].trade_id + 1 if len(rows) == page_size else None
