"""Reading stored order-book snapshots (``book_snapshots``, written by drain-prices).

A stored snapshot is the ``BookUpdate`` it came from (kind "snapshot"): each side as two
numeric arrays, best level first, exact ``Decimal``s. Only snapshots are stored, so "the
book at T" is the newest snapshot at or before T, as old as the snapshot interval
ingestion publishes at; the deltas between snapshots stay on Kafka.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple

from psycopg2 import sql

from tasks.core.events import BookLevel, BookUpdate

_AT = """
SELECT event_us, seq, depth, recv_us, bid_prices, bid_qtys, ask_prices, ask_qtys
FROM {table} WHERE venue = %s AND symbol = %s AND event_us <= %s
ORDER BY event_us DESC LIMIT 1
"""
# Depth: the quantity of every stored level of a side (the snapshot's top ``depth``).
_HISTORY = """
SELECT event_us, bid_prices[1], ask_prices[1], ask_prices[1] - bid_prices[1],
       (bid_prices[1] + ask_prices[1]) * 0.5,
       (SELECT coalesce(sum(q), 0) FROM unnest(bid_qtys) q),
       (SELECT coalesce(sum(q), 0) FROM unnest(ask_qtys) q)
FROM {table} WHERE venue = %s AND symbol = %s AND event_us >= %s AND event_us < %s
ORDER BY event_us
"""


class SpreadPoint(NamedTuple):
    """One snapshot's top of book. ``bid``/``ask`` (and what needs both) are None when
    that side was empty; depths are the sums of the stored levels' quantities."""

    event_us: int
    bid: Decimal | None
    ask: Decimal | None
    spread: Decimal | None
    mid: Decimal | None
    bid_depth: Decimal
    ask_depth: Decimal


def _table(schema: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier("book_snapshots")])


def _levels(prices: list[Decimal], qtys: list[Decimal]) -> tuple[BookLevel, ...]:
    return tuple(zip(prices, qtys, strict=True))


def book_at(conn, venue: str, symbol: str, t_us: int, schema: str = "public") -> BookUpdate | None:
    """The newest stored snapshot of (venue, symbol) at or before ``t_us`` (event time);
    None when there is none. One backward probe of the table's key."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL(_AT).format(table=_table(schema)), (venue, symbol, t_us))
        row = cur.fetchone()
    if row is None:
        return None
    event_us, seq, depth, recv_us, bp, bq, ap, aq = row
    return BookUpdate(
        venue, symbol, "snapshot", seq, depth, _levels(bp, bq), _levels(ap, aq), event_us, recv_us
    )


def spread_history(
    conn, venue: str, symbol: str, start_us: int, end_us: int, schema: str = "public"
) -> list[SpreadPoint]:
    """Every stored snapshot of (venue, symbol) in [start_us, end_us), oldest first: best
    bid and ask, spread, mid, and the quantity on each side, all exact."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(_HISTORY).format(table=_table(schema)), (venue, symbol, start_us, end_us)
        )
        return [SpreadPoint(*row) for row in cur.fetchall()]
