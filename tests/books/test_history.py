"""book_at and spread_history give exact values on hand-built stored snapshots.

PostgreSQL only: snapshots are written through the price drain's batch and sink.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal as D

import pytest

from tasks.books.history import SpreadPoint, book_at, spread_history
from tasks.core.events import BookUpdate
from tasks.core.pg import connect
from tests.drain.support import pg_schema, store_books

T0 = 1_790_000_040_000_000  # on a minute boundary, in the past
S = 1_000_000


def snap(seq: int, at_s: int, bids, asks, symbol: str = "BTC-USDT") -> BookUpdate:
    sides = [tuple((D(p), D(q)) for p, q in side) for side in (bids, asks)]
    return BookUpdate("binance", symbol, "snapshot", seq, 5, *sides, T0 + at_s * S,
                      T0 + at_s * S + 250)  # fmt: skip


A = snap(1, 10, [("100.00", "1"), ("99.95", "2")], [("100.10", "3"), ("100.40", "0.00000001")])
B = snap(7, 40, [("100.20", "4.5")], [("100.30", "2")])
ONE_SIDED = snap(8, 50, [("100.15", "1")], [])
OTHER = snap(1, 20, [("5", "1")], [("6", "1")], symbol="ETH-USDT")  # another book


@pytest.fixture(scope="module")
def stored(postgres):
    with pg_schema(postgres.pg_dsn) as schema:
        assert store_books(postgres.pg_dsn, schema, [A, B, ONE_SIDED, OTHER]) == {
            "book_snapshots": 4
        }
        with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn:
            yield conn, schema


@pytest.mark.parametrize(
    ("at_s", "expected"),
    [(9, None), (10, A), (39, A), (40, B), (49, B), (50, ONE_SIDED), (10_000, ONE_SIDED)],
)
def test_book_at_is_the_newest_snapshot_at_or_before_t(stored, at_s, expected):
    conn, schema = stored
    assert book_at(conn, "binance", "BTC-USDT", T0 + at_s * S, schema) == expected


def test_book_at_keeps_every_decimal_as_written(stored):
    conn, schema = stored
    got = book_at(conn, "binance", "BTC-USDT", A.event_us, schema)
    written = [x.as_tuple() for side in (A.bids, A.asks) for level in side for x in level]
    assert [x.as_tuple() for side in (got.bids, got.asks) for lv in side for x in lv] == written
    assert book_at(conn, "binance", "SOL-USDT", A.event_us, schema) is None


def test_spread_history_gives_exact_top_of_book_and_depth(stored):
    conn, schema = stored
    assert spread_history(conn, "binance", "BTC-USDT", T0, T0 + 60 * S, schema) == [
        SpreadPoint(A.event_us, D("100.00"), D("100.10"), D("0.10"), D("100.05"),
                    D("3"), D("3.00000001")),
        SpreadPoint(B.event_us, D("100.20"), D("100.30"), D("0.10"), D("100.25"),
                    D("4.5"), D("2")),
        SpreadPoint(ONE_SIDED.event_us, D("100.15"), None, None, None, D("1"), D("0")),
    ]  # fmt: skip
    # [start, end): a snapshot at end is left out, one at start is in
    assert [p.event_us for p in spread_history(conn, "binance", "BTC-USDT", A.event_us,
                                               B.event_us, schema)] == [A.event_us]  # fmt: skip
