"""Per-minute book statistics equal hand-computed values, and recomputing is idempotent.

PostgreSQL only: snapshots are written through the price drain's batch and sink (whose
statement marks the minutes dirty), then ``aggregate_final`` claims and computes them.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal as D

import pytest

from tasks.analytics.books import aggregate_final, bands, last_final_minute, recompute
from tasks.core.events import BookUpdate
from tasks.core.pg import connect
from tests.drain.support import pg_schema, store_books

T0 = 1_790_000_040_000_000  # on a minute boundary, in the past
S = 1_000_000
M = 60 * S


def snap(seq: int, at_s: int, bids, asks) -> BookUpdate:
    sides = [tuple((D(p), D(q)) for p, q in side) for side in (bids, asks)]
    return BookUpdate("binance", "BTC-USDT", "snapshot", seq, 5, *sides, T0 + at_s * S,
                      T0 + at_s * S + 250)  # fmt: skip


# Minute 0. A: mid 100.05, spread 0.10; +-10 bps is [99.94995, 100.15005]: bids 1 + 2,
# asks 3; +-50 bps is [99.54975, 100.55025]: bids 1 + 2, asks 3 + 8.
A = snap(1, 10, [("100.00", "1"), ("99.95", "2"), ("99.00", "5")],
         [("100.10", "3"), ("100.40", "8"), ("101.00", "4")])  # fmt: skip
# B: mid 100.25, spread 0.10; +-10 bps [100.14975, 100.35025]: bids 3, asks 1;
# +-50 bps [99.74875, 100.75125]: bids 3 + 2, asks 1.
B = snap(2, 40, [("100.20", "3"), ("100.10", "2")], [("100.30", "1"), ("100.90", "6")])
ONE_SIDED = snap(3, 50, [("100.15", "1")], [])  # no mid: left out
# Minute 1. C: mid 100, spread 0.02; the +-50 bps band ends exactly on 99.50 and 100.50
# (inside), 99.49 and 100.51 are outside; +-10 bps [99.9, 100.1]: bids 1, asks 1.
C = snap(4, 65, [("99.99", "1"), ("99.50", "2"), ("99.49", "4")],
         [("100.01", "1"), ("100.50", "3"), ("100.51", "5")])  # fmt: skip

COLUMNS = "minute_us, band_bps, snapshots, mean_spread, mean_mid, last_mid, bid_depth, ask_depth"
EXPECTED = {
    # minute, band: snapshots, mean spread, mean mid, last mid, bid depth, ask depth, imbalance
    (T0, 10): (2, D("0.1"), D("100.15"), D("100.25"), D(3), D(2), D("0.2")),
    (T0, 50): (2, D("0.1"), D("100.15"), D("100.25"), D(4), D(6), D("-0.2")),
    (T0 + M, 10): (1, D("0.02"), D(100), D(100), D(1), D(1), D(0)),
    (T0 + M, 50): (1, D("0.02"), D(100), D(100), D(3), D(4), D(-1) / 7),
}


@pytest.fixture
def db(postgres):
    with (
        pg_schema(postgres.pg_dsn) as schema,
        contextlib.closing(connect(postgres.pg_dsn, schema)) as conn,
    ):
        yield postgres.pg_dsn, schema, conn


def minutes(conn) -> dict[tuple[int, int], tuple]:
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS}, imbalance FROM book_minutes ORDER BY 1, 2")
        return {(m, b): tuple(rest) for m, b, *rest in cur.fetchall()}


def assert_expected(got: dict, keys) -> None:
    assert set(got) == set(keys)
    for key in keys:
        *exact, imbalance = got[key]
        *want, want_imbalance = EXPECTED[key]
        assert exact == want, key
        assert abs(imbalance - want_imbalance) < D("1e-15"), key  # a rounded division


def test_minutes_equal_hand_computed_values_once_final(db):
    dsn, schema, conn = db
    store_books(dsn, schema, [A, B, ONE_SIDED, C])
    # at T0 + 90 s only minute 0 has closed: minute 1 stays dirty
    assert aggregate_final(conn, T0 + 90 * S, 0, [10, 50]) == {"minutes": 1, "rows": 2}
    assert_expected(minutes(conn), [(T0, 10), (T0, 50)])
    assert aggregate_final(conn, T0 + 10 * M, 0, [50, 10]) == {"minutes": 1, "rows": 2}
    assert_expected(minutes(conn), EXPECTED)
    assert aggregate_final(conn, T0 + 10 * M, 0, [10, 50]) == {"minutes": 0, "rows": 0}


def test_recomputing_gives_the_same_rows_and_a_late_snapshot_changes_its_minute(db):
    dsn, schema, conn = db
    store_books(dsn, schema, [A, B, ONE_SIDED, C])
    aggregate_final(conn, T0 + 10 * M, 0, [10, 50])
    first = minutes(conn)
    with conn, conn.cursor() as cur:  # recompute every minute again, as a rerun would
        assert recompute(cur, [("binance", "BTC-USDT", T0), ("binance", "BTC-USDT", T0 + M)],
                         [10, 50]) == 4  # fmt: skip
    assert minutes(conn) == first
    store_books(dsn, schema, [A, B])  # a replay: nothing new, nothing changes
    aggregate_final(conn, T0 + 10 * M, 0, [10, 50])
    assert minutes(conn) == first

    late = snap(9, 55, [("100.00", "7")], [("100.20", "1")])  # mid 100.10, spread 0.20
    store_books(dsn, schema, [late])
    assert aggregate_final(conn, T0 + 10 * M, 0, [10, 50]) == {"minutes": 1, "rows": 2}
    now = minutes(conn)
    assert {k: v for k, v in now.items() if k[0] != T0} == {
        k: v for k, v in first.items() if k[0] != T0
    }
    snapshots, spread, mid, last, bid, ask, imbalance = now[(T0, 10)]
    assert (snapshots, last) == (3, D("100.10"))
    # bids within +-10 bps of 100.10: 3 + 3 + 7, asks 3 + 1 + 1; means are rounded divisions
    for got, want in ((spread, D("0.4") / 3), (mid, D("300.4") / 3), (bid, D(13) / 3),
                      (ask, D(5) / 3), (imbalance, D(8) / 18)):  # fmt: skip
        assert abs(got - want) < D("1e-15"), (got, want)


def test_bands_and_the_last_final_minute():
    assert bands([50, 10, 10]) == [10, 50]
    for bad in ([], [0], [10_001], [2.5]):
        with pytest.raises(ValueError):
            bands(bad)
    assert last_final_minute(T0 + 90 * S, 0) == T0
    assert last_final_minute(T0 + 2 * M, 0) == T0 + M  # closed exactly now
    assert last_final_minute(T0 + 2 * M, 1) == T0
