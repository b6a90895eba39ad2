"""Recompute candle windows from stored trades: the work behind ``flows/aggregate.py``.

One call handles one series (venue, symbol, interval) in one transaction: read the
windows' trades, compute candles (``tasks.analytics.candles``), upsert them, delete candles of
windows left without trades, recompute indicators forward from the earliest change
(``tasks.analytics.candle_store``), clear those pending windows, publish the new or changed 1 m
candles, then commit.

Delivery of ``market.candles.1m``: messages are sent and acknowledged *before* the
commit, so a candle is never stored-but-unpublished; if the commit then fails, the
windows are still pending and the next run publishes them again (at least once). The
message is the codec's candle (``tasks.core.codec.decode`` reads it as a ``Candle``) plus an
``indicators`` object (decimals as strings), keyed by symbol; consumers keep the latest
per (venue, symbol, interval, open_us).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.analytics import candle_store as store
from tasks.analytics import candles as cdl
from tasks.analytics import indicators as ind
from tasks.core import codec
from tasks.core.events import Candle
from tasks.core.topics import CANDLES

log = logging.getLogger(__name__)
PUBLISHED_INTERVAL = "1m"  # what market.candles.1m carries
CHUNK_SPAN_US = 6 * 3_600_000_000  # trades loaded per transaction: at most 6 h of a symbol


@dataclass
class Outcome:
    """What recomputing some windows of one series did."""

    windows: int = 0
    changed: list[Candle] = field(default_factory=list)
    deleted: int = 0
    indicators: int = 0
    published: int = 0

    def add(self, other: Outcome) -> None:
        self.windows += other.windows
        self.changed += other.changed
        self.deleted += other.deleted
        self.indicators += other.indicators
        self.published += other.published


def candle_message(candle: Candle, indicators: dict[str, Any] | None) -> bytes:
    doc = codec.to_dict(candle)
    doc["indicators"] = {
        k: (None if v is None else str(v)) if k != "spec" else v
        for k, v in (indicators or {}).items()
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def recompute(
    conn,
    key: store.SeriesKey,
    opens: Sequence[int],
    spec: ind.Spec,
    producer=None,
    topic: str = CANDLES,
    trades=None,
    indicators_until: int | None = None,
) -> Outcome:
    """Recompute the candles of ``opens`` (ascending window open times of ``key``) from
    trades, clear them from ``candle_pending``, recompute the indicators of every candle
    from the first of ``opens`` up to ``indicators_until`` (None: the series' end, as an
    EWMA change ripples forward), and publish changed 1 m candles, in one transaction.
    ``trades``: the windows' trades if the caller already has them."""
    out = Outcome(windows=len(opens))
    if not opens:
        return out
    with conn, conn.cursor() as cur:
        store.lock_series(conn, key)
        if trades is None:
            trades = store.trades_in_windows(conn, key, opens)
        frame = cdl.compute(trades, key.interval)
        out.changed = store.upsert_candles(cur, frame)
        empty = set(opens) - set(frame["open_us"].tolist())
        out.deleted = store.delete_candles(cur, key, empty) if empty else 0
        out.indicators = store.recompute_indicators(
            cur, key, opens[0], spec, until_us=indicators_until
        )
        store.clear_pending(cur, key, opens)
        if producer is not None and key.interval == PUBLISHED_INTERVAL and out.changed:
            out.published = publish(conn, key, out.changed, producer, topic)
    return out


def publish(conn, key: store.SeriesKey, changed: list[Candle], producer, topic: str) -> int:
    """Send the changed candles with their indicators and wait for every ack."""
    extra = store.indicators_at(conn, key, [c.open_us for c in changed])
    futures = [
        producer.send(topic, key=c.symbol.encode(), value=candle_message(c, extra.get(c.open_us)))
        for c in changed
    ]
    producer.flush(timeout=60)
    for f in futures:
        f.get(timeout=0)  # raises on a failed delivery: the transaction rolls back
    return len(futures)


def chunks(opens: Sequence[int], width_us: int, span_us: int) -> list[list[int]]:
    """Ascending window open times in runs covering at most ``span_us`` of trades (at
    least one window each), so one transaction never loads an unbounded history."""
    out: list[list[int]] = []
    for t in sorted(opens):
        if out and t + width_us - out[-1][0] <= span_us:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def recompute_windows(
    conn,
    key: store.SeriesKey,
    opens: Sequence[int],
    spec: ind.Spec,
    producer=None,
    topic: str = CANDLES,
    span_us: int = CHUNK_SPAN_US,
) -> Outcome:
    """``recompute`` for any number of windows, one transaction per chunk, in time
    order. Each chunk recomputes the indicators up to the next chunk's first window and
    the last one to the series' end, so after a crash between chunks the windows still
    pending continue a consistent EWMA chain."""
    total = Outcome()
    runs = chunks(opens, key.width_us, span_us)
    for i, run in enumerate(runs):
        until = runs[i + 1][0] if i + 1 < len(runs) else None
        total.add(recompute(conn, key, run, spec, producer, topic, indicators_until=until))
    return total


def rebuild(
    conn,
    key: store.SeriesKey,
    start_us: int,
    end_us: int,
    spec: ind.Spec,
    producer=None,
    topic: str = CANDLES,
    span_us: int = CHUNK_SPAN_US,
) -> Outcome:
    """Make the series' candles in the windows overlapping [start_us, end_us) exactly
    what the stored trades say (windows without trades lose their candle), one
    transaction per ``span_us`` of windows, in order, each recomputing its indicators
    whether or not a candle changed (so a rerun after a crash finishes what the first
    left); then carry the EWMA ripple on to the series' end."""
    width = key.width_us
    first = cdl.window_open(start_us, width)
    last = cdl.window_open(end_us - 1, width) + width
    step = max(width, span_us // width * width)
    total = Outcome()
    for lo in range(first, last, step):
        hi = min(lo + step, last)
        trades = store.trades_between(conn, key.venue, key.symbol, lo, hi)
        opens = list(range(lo, hi, width))
        total.add(recompute(conn, key, opens, spec, producer, topic, trades, hi))
    with conn, conn.cursor() as cur:
        store.lock_series(conn, key)
        total.indicators += store.recompute_indicators(cur, key, last, spec)
    return total
