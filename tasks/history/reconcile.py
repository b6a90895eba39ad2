"""Stored trades checked against the venue's own REST history, hour by hour: the work
behind ``flows/reconcile.py``.

Gap repair closes the holes ingestion sees; reconciliation finds the ones nobody saw (a
bug, a lost partition, a restore from an old backup, a drain that skipped records). For
each (venue, symbol, UTC hour) it compares the trade ids the venue lists for the hour
with the ids PostgreSQL holds for it, and records counts, id ranges and traded volume on
both sides in ``reconcile_hours``:

- *missing*: the venue lists the trade, the table does not hold its id. These are
  published to Kafka exactly as backfilled ones (``live=False``), so they reach the table
  through the normal drain with its exactly-once key; nothing here writes trades.
- *extra*: the table holds a trade of the hour whose id the venue does not list for it.
  Reported, never deleted: a venue's REST history can be incomplete too, and deleting
  acknowledged data is not a reconciler's call.

Memory is one hour of one symbol at a time, as two sets of integer ids plus the missing
trades themselves; the venue's trades stream through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tasks.core.events import Trade
from tasks.history.backfill import publish_all
from tasks.ingest.publish import Lane
from tasks.venues.http import HOUR_US

DAY_US = 24 * HOUR_US


def hours(start_us: int, end_us: int) -> list[int]:
    """The UTC hours that cover [start_us, end_us): from the hour holding ``start_us`` to
    the one holding ``end_us - 1``."""
    first = start_us - start_us % HOUR_US
    return list(range(first, end_us, HOUR_US))


@dataclass
class HourCheck:
    """One (venue, symbol, hour) compared. ``missing`` counts the venue's trades the table
    lacked when checked; ``refilled`` how many of them the drain had stored by the end."""

    venue: str
    symbol: str
    hour_us: int
    venue_trades: int = 0
    stored_trades: int = 0
    venue_first_id: int | None = None
    venue_last_id: int | None = None
    stored_first_id: int | None = None
    stored_last_id: int | None = None
    venue_volume: Decimal = Decimal(0)
    stored_volume: Decimal = Decimal(0)
    missing: int = 0
    extra: list[int] = field(default_factory=list)
    refilled: int = 0

    def row(self) -> dict[str, Any]:
        """What the report and the table show (ids of the first few extra trades)."""
        return {
            "symbol": self.symbol,
            "hour_us": self.hour_us,
            "venue_trades": self.venue_trades,
            "stored_trades": self.stored_trades,
            "missing": self.missing,
            "extra": len(self.extra),
            "refilled": self.refilled,
            "venue_ids": _range(self.venue_first_id, self.venue_last_id),
            "stored_ids": _range(self.stored_first_id, self.stored_last_id),
            "venue_volume": str(self.venue_volume),
            "stored_volume": str(self.stored_volume),
            "extra_ids": self.extra[:10],
        }


def _range(lo: int | None, hi: int | None) -> str:
    return "" if lo is None else f"{lo}..{hi}"


def stored_hour(conn, venue: str, symbol: str, hour_us: int) -> dict[int, Decimal]:
    """Quantity by trade id of the stored trades of ``symbol`` in the hour."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT trade_id, qty FROM trades WHERE venue = %s AND symbol = %s
               AND event_us >= %s AND event_us < %s""",
            (venue, symbol, hour_us, hour_us + HOUR_US),
        )
        return dict(cur.fetchall())


def stored_elsewhere(conn, venue: str, symbol: str, ids: list[int]) -> set[int]:
    """Those of ``ids`` stored with a time outside the hour (the venue's REST and its
    stream disagreeing on a trade's time must not refill a trade the table holds)."""
    if not ids:
        return set()
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT trade_id FROM trades WHERE venue = %s AND symbol = %s
               AND trade_id = ANY(%s)""",
            (venue, symbol, ids),
        )
        return {r[0] for r in cur.fetchall()}


def check_hour(
    conn, venue_trades: Iterable[Trade], venue: str, symbol: str, hour_us: int
) -> tuple[HourCheck, list[Trade]]:
    """Compare the venue's trades of one hour (streamed) with the stored ones; returns the
    check and the venue's trades the table lacks."""
    stored = stored_hour(conn, venue, symbol, hour_us)
    out = HourCheck(venue, symbol, hour_us, stored_trades=len(stored))
    if stored:
        out.stored_first_id, out.stored_last_id = min(stored), max(stored)
        out.stored_volume = sum(stored.values(), Decimal(0))
    listed: set[int] = set()
    candidates: list[Trade] = []
    for t in venue_trades:
        if not hour_us <= t.event_us < hour_us + HOUR_US or t.trade_id in listed:
            continue  # a client's page overlapping the hour's edges, or a repeated row
        listed.add(t.trade_id)
        out.venue_volume += t.qty
        if t.trade_id not in stored:
            candidates.append(t)
    out.venue_trades = len(listed)
    if listed:
        out.venue_first_id, out.venue_last_id = min(listed), max(listed)
    elsewhere = stored_elsewhere(conn, venue, symbol, [t.trade_id for t in candidates])
    missing = [t for t in candidates if t.trade_id not in elsewhere]
    out.missing = len(missing)
    out.extra = sorted(set(stored) - listed)
    return out, missing


def refill(lane: Lane, check: HourCheck, missing: list[Trade]) -> int:
    """Publish the hour's missing trades to Kafka and wait for every ack."""
    return publish_all(lane, missing, f"{check.venue} {check.symbol} {check.hour_us} reconcile")


def count_refilled(conn, checks: list[HourCheck]) -> None:
    """Set ``refilled`` of each check from the rows stored since: the hour's count now,
    less what it held when checked, at most what was missing."""
    by_symbol: dict[tuple[str, str], list[HourCheck]] = {}
    for c in checks:
        by_symbol.setdefault((c.venue, c.symbol), []).append(c)
    for (venue, symbol), group in by_symbol.items():
        now = stored_counts(conn, venue, symbol, [c.hour_us for c in group if c.missing])
        for c in group:
            if c.missing:
                c.refilled = min(c.missing, max(0, now[c.hour_us] - c.stored_trades))


def stored_counts(conn, venue: str, symbol: str, hour_list: list[int]) -> dict[int, int]:
    """Stored trades per hour of ``hour_list`` (hours without any are 0)."""
    counts = dict.fromkeys(hour_list, 0)
    if not hour_list:
        return counts
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT event_us - event_us %% %s AS hour, count(*) FROM trades
               WHERE venue = %s AND symbol = %s AND event_us >= %s AND event_us < %s
               GROUP BY 1""",
            (HOUR_US, venue, symbol, min(hour_list), max(hour_list) + HOUR_US),
        )
        for hour, n in cur.fetchall():
            if hour in counts:
                counts[hour] = n
    return counts


def record(conn, checks: list[HourCheck]) -> None:
    """Upsert the checks into ``reconcile_hours`` (a rerun of an hour replaces it)."""
    with conn, conn.cursor() as cur:
        for c in checks:
            cur.execute(
                """INSERT INTO reconcile_hours (venue, symbol, hour_us, venue_trades,
                       stored_trades, missing, extra, refilled, venue_first_id, venue_last_id,
                       stored_first_id, stored_last_id, venue_volume, stored_volume)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (venue, symbol, hour_us) DO UPDATE SET
                       venue_trades = excluded.venue_trades,
                       stored_trades = excluded.stored_trades, missing = excluded.missing,
                       extra = excluded.extra, refilled = excluded.refilled,
                       venue_first_id = excluded.venue_first_id,
                       venue_last_id = excluded.venue_last_id,
                       stored_first_id = excluded.stored_first_id,
                       stored_last_id = excluded.stored_last_id,
                       venue_volume = excluded.venue_volume,
                       stored_volume = excluded.stored_volume, checked_at = now()""",
                (
                    c.venue, c.symbol, c.hour_us, c.venue_trades, c.stored_trades,
                    c.missing, len(c.extra), c.refilled, c.venue_first_id,
                    c.venue_last_id, c.stored_first_id, c.stored_last_id, c.venue_volume,
                    c.stored_volume,
                ),
            )  # fmt: skip
