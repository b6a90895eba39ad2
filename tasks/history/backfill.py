"""REST backfill in pages, resumable: the work behind ``flows/backfill.py``.

A range is cut into pages per symbol, aligned to multiples of the page length from the
epoch (so two backfills of overlapping ranges share their inner pages). A page is
fetched through the venue's REST client (``tasks.venues.http``: paced, weight-aware,
Retry-After and backoff), its trades are published to Kafka through the ingestion
``Publisher`` exactly as live ones (keyed by symbol, counted on the broker's ack), and
once every one is acknowledged the page is recorded in ``backfill_pages``. A rerun
skips recorded pages, so a crash costs at most the page in flight; that page's trades
may then be published twice, which the drain's (venue, symbol, trade_id) key absorbs.
Venue klines pages are upserted into ``candles`` and recorded in the same transaction.

Progress is stored in PostgreSQL rather than as Prefect task-cache entries: it lives
next to the data it describes, survives a lost result store or a different worker, and
an operator can read it (``SELECT * FROM backfill_pages``).

A page is recorded only when it ended ``settle_s`` before it was fetched: a page that
reaches into the present is published but fetched again next time, as more trades may
still arrive in it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tasks.analytics import candle_store as store
from tasks.analytics import candles as cdl
from tasks.core.events import Candle, Trade
from tasks.ingest.publish import Lane

TRADES = "trades"


@dataclass(frozen=True, order=True)
class Page:
    symbol: str
    start_us: int
    end_us: int


def plan_pages(symbols: Iterable[str], start_us: int, end_us: int, page_us: int) -> list[Page]:
    """[start_us, end_us) per symbol in epoch-aligned pages of ``page_us``, in time order
    per symbol."""
    if page_us <= 0 or end_us <= start_us:
        raise ValueError("need page_us > 0 and end_us > start_us")
    out = []
    for symbol in symbols:
        lo = start_us
        while lo < end_us:
            hi = min(end_us, (lo // page_us + 1) * page_us)
            out.append(Page(symbol, lo, hi))
            lo = hi
    return out


def done_pages(conn, venue: str, kind: str, pages: list[Page]) -> set[Page]:
    """The pages of ``pages`` recorded as finished."""
    if not pages:
        return set()
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT symbol, start_us, end_us FROM backfill_pages
               WHERE venue = %s AND kind = %s AND symbol = ANY(%s)
                 AND start_us >= %s AND end_us <= %s""",
            (
                venue,
                kind,
                sorted({p.symbol for p in pages}),
                min(p.start_us for p in pages),
                max(p.end_us for p in pages),
            ),
        )
        return {Page(*r) for r in cur.fetchall()} & set(pages)


def _record(cur, venue: str, kind: str, page: Page, rows: int, first_id, last_id) -> None:
    cur.execute(
        """INSERT INTO backfill_pages (venue, symbol, kind, start_us, end_us, rows, first_id,
                                      last_id)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (venue, symbol, kind, start_us, end_us) DO UPDATE
           SET rows = excluded.rows, first_id = excluded.first_id,
               last_id = excluded.last_id, done_at = now()""",
        (venue, page.symbol, kind, page.start_us, page.end_us, rows, first_id, last_id),
    )


@dataclass
class PageResult:
    page: Page
    rows: int = 0
    first_id: int | None = None
    last_id: int | None = None
    recorded: bool = False
    changed: int = 0  # klines: candles new or changed


def backfill_trade_page(
    conn, client, lane: Lane, venue: str, page: Page, settle_s: float = 10.0
) -> PageResult:
    """Fetch one page of trades, publish them, wait for every ack, record the page."""
    fetched_at = time.time_ns() // 1000
    out = PageResult(page)
    trades = list(client.trades_by_time(page.symbol, page.start_us, page.end_us))
    out.rows = publish_all(lane, trades, f"{venue} {page.symbol} backfill")
    if trades:
        out.first_id = min(t.trade_id for t in trades)
        out.last_id = max(t.trade_id for t in trades)
    if page.end_us <= fetched_at - int(settle_s * 1_000_000):
        with conn, conn.cursor() as cur:
            _record(cur, venue, TRADES, page, out.rows, out.first_id, out.last_id)
        out.recorded = True
    return out


def publish_all(lane: Lane, trades: Iterable[Trade], what: str) -> int:
    """Publish ``trades`` as history (``live=False``) and wait for every ack; RuntimeError
    if Kafka refused any, so the caller records nothing and a rerun publishes them again
    (the drain's (venue, symbol, trade_id) key absorbs what did land twice)."""
    n = 0
    for t in trades:
        lane.publish(t, live=False)
        n += 1
    lane.publisher.flush(timeout=120)
    failed = lane.take_failed()
    if failed or lane.publisher.in_flight:
        raise RuntimeError(
            f"{what}: {len(failed) or lane.publisher.in_flight} trades not acknowledged by"
            " Kafka; nothing is recorded as done, and a rerun publishes them again"
        )
    return n


def backfill_kline_page(
    conn, client, venue: str, interval: str, page: Page, settle_s: float = 10.0
) -> PageResult:
    """Fetch one page of venue klines and upsert them as candles (source 'venue') where
    no candle from our trades exists, recording the page in the same transaction. Only
    closed klines are stored."""
    fetched_at = time.time_ns() // 1000
    width = cdl.interval_us(interval)
    closed = [
        c
        for c in client.klines(page.symbol, interval, page.start_us, page.end_us)
        if c.open_us + width <= fetched_at
    ]
    out = PageResult(page, rows=len(closed))
    key = store.SeriesKey(venue, page.symbol, interval)
    with conn, conn.cursor() as cur:
        store.lock_series(conn, key)
        out.changed = len(store.upsert_candles(cur, candle_frame(closed)))
        if page.end_us <= fetched_at - int(settle_s * 1_000_000):
            _record(cur, venue, f"klines:{interval}", page, out.rows, None, None)
            out.recorded = True
    return out


def candle_frame(candles: list[Candle]) -> pd.DataFrame:
    return pd.DataFrame(
        [tuple(getattr(c, f) for f in cdl.CANDLE_COLUMNS) for c in candles],
        columns=list(cdl.CANDLE_COLUMNS),
    )


@dataclass
class Progress:
    """Pages, rows and an ETA from the pace so far."""

    total_pages: int
    skipped: int = 0
    done: int = 0
    rows: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: PageResult) -> None:
        self.done += 1
        self.rows += result.rows

    @property
    def left(self) -> int:
        return self.total_pages - self.skipped - self.done

    @property
    def eta_s(self) -> float | None:
        if not self.done:
            return None
        return (time.monotonic() - self.started) / self.done * self.left

    @property
    def fraction(self) -> float:
        return (self.skipped + self.done) / self.total_pages if self.total_pages else 1.0

    def line(self) -> str:
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f} s"
        return (
            f"pages {self.skipped + self.done}/{self.total_pages} ({self.skipped} already done), "
            f"rows {self.rows}, {self.rows / max(1e-9, time.monotonic() - self.started):.0f}/s, "
            f"ETA {eta}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "pages": self.total_pages,
            "skipped": self.skipped,
            "fetched": self.done,
            "rows": self.rows,
            "seconds": round(time.monotonic() - self.started, 3),
        }
