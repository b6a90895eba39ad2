"""Per-minute order-book statistics from stored snapshots, into ``book_minutes``.

For each closed minute (event time) of a book (venue, symbol), from the snapshots in it
that have both sides, and for each band of +-``bps`` basis points around each snapshot's
mid:

- ``mean_spread``, ``mean_mid``: means over the snapshots of ask - bid and (bid + ask) / 2
  (best levels); ``last_mid``: the mid of the minute's newest snapshot;
- ``bid_depth``, ``ask_depth``: the mean over the snapshots of the quantity within the
  band (bids priced >= mid * (1 - bps/10^4), asks <= mid * (1 + bps/10^4));
- ``imbalance``: (bid_depth - ask_depth) / (bid_depth + ask_depth), NULL when both are 0.

All of it is one SQL statement over NUMERIC: band tests are exact (the comparisons are
multiplied out, no division), means and the imbalance are divisions PostgreSQL rounds
to its numeric precision (at least 16 significant digits), trailing zeros trimmed.

Which minutes: every statement that inserts snapshots marks its (venue, symbol, minute)
in ``book_minute_dirty`` in the same transaction (a trigger, migration 0700). A run
claims the marks of final minutes (closed ``grace`` ago) and recomputes those minutes
in the same transaction, deleting the marks first: the recomputing statement's snapshot
is newer than the claim's, so it sees every snapshot a claimed mark stands for; a mark
committed meanwhile stays for the next run. Recomputing is an upsert of whole rows, so
a rerun, a replay or a late snapshot gives the same rows as computing once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MINUTE_US = 60_000_000
DEFAULT_BANDS_BPS = (10, 50)
CLAIM_BATCH = 5_000  # dirty marks claimed per transaction

_RECOMPUTE = """
WITH m AS (
    SELECT DISTINCT venue, symbol, minute_us
    FROM unnest(%(venues)s::text[], %(symbols)s::text[], %(minutes)s::bigint[])
        AS m(venue, symbol, minute_us)
), s AS (
    SELECT b.venue, b.symbol, m.minute_us, b.event_us,
           b.bid_prices, b.bid_qtys, b.ask_prices, b.ask_qtys,
           b.bid_prices[1] + b.ask_prices[1] AS twice_mid,
           b.ask_prices[1] - b.bid_prices[1] AS spread
    FROM m JOIN book_snapshots b
      ON b.venue = m.venue AND b.symbol = m.symbol
     AND b.event_us >= m.minute_us AND b.event_us < m.minute_us + 60000000
    WHERE cardinality(b.bid_prices) > 0 AND cardinality(b.ask_prices) > 0
), d AS MATERIALIZED (  -- each depth summed once (inlined, every use would sum again)
    -- p >= mid * (1 - bps/10^4)  <=>  p * 2 * 10^4 >= twice_mid * (10^4 - bps)
    SELECT s.venue, s.symbol, s.minute_us, s.event_us, s.spread, s.twice_mid, x.bps,
           (SELECT coalesce(sum(l.q), 0) FROM unnest(s.bid_prices, s.bid_qtys) AS l(p, q)
             WHERE l.p * 20000 >= s.twice_mid * (10000 - x.bps)) AS bid_depth,
           (SELECT coalesce(sum(l.q), 0) FROM unnest(s.ask_prices, s.ask_qtys) AS l(p, q)
             WHERE l.p * 20000 <= s.twice_mid * (10000 + x.bps)) AS ask_depth
    FROM s CROSS JOIN unnest(%(bands)s::integer[]) AS x(bps)
)
INSERT INTO book_minutes AS t (venue, symbol, minute_us, band_bps, snapshots, mean_spread,
                               mean_mid, last_mid, bid_depth, ask_depth, imbalance)
SELECT venue, symbol, minute_us, bps, count(*),
       trim_scale(avg(spread)), trim_scale(avg(twice_mid) * 0.5),
       trim_scale((array_agg(twice_mid ORDER BY event_us DESC))[1] * 0.5),
       trim_scale(avg(bid_depth)), trim_scale(avg(ask_depth)),
       trim_scale((sum(bid_depth) - sum(ask_depth)) / nullif(sum(bid_depth) + sum(ask_depth), 0))
FROM d GROUP BY venue, symbol, minute_us, bps
ON CONFLICT (venue, symbol, minute_us, band_bps) DO UPDATE SET
    snapshots = EXCLUDED.snapshots, mean_spread = EXCLUDED.mean_spread,
    mean_mid = EXCLUDED.mean_mid, last_mid = EXCLUDED.last_mid,
    bid_depth = EXCLUDED.bid_depth, ask_depth = EXCLUDED.ask_depth,
    imbalance = EXCLUDED.imbalance
"""
# A minute left without two-sided snapshots (never, unless rows were deleted) loses its rows.
_DELETE_EMPTY = """
DELETE FROM book_minutes t
USING unnest(%(venues)s::text[], %(symbols)s::text[], %(minutes)s::bigint[])
    AS m(venue, symbol, minute_us)
WHERE t.venue = m.venue AND t.symbol = m.symbol AND t.minute_us = m.minute_us
  AND NOT EXISTS (
    SELECT 1 FROM book_snapshots b
    WHERE b.venue = m.venue AND b.symbol = m.symbol
      AND b.event_us >= m.minute_us AND b.event_us < m.minute_us + 60000000
      AND cardinality(b.bid_prices) > 0 AND cardinality(b.ask_prices) > 0)
"""
_CLAIM = """
DELETE FROM book_minute_dirty WHERE seq IN (
    SELECT seq FROM book_minute_dirty WHERE minute_us <= %s ORDER BY seq LIMIT %s)
RETURNING venue, symbol, minute_us
"""

Minute = tuple[str, str, int]  # venue, symbol, minute_us


def bands(values: Iterable[int]) -> list[int]:
    """Band widths in basis points: a list of whole numbers in [1, 10000]; sorted, once each."""
    out = list(values) if isinstance(values, list | tuple) else []
    if not out or any(type(b) is not int or not 1 <= b <= 10_000 for b in out):
        raise ValueError(f"expected a list of whole basis points in [1, 10000], got {values!r:.60}")
    return sorted(set(out))


def recompute(cur, minutes: Sequence[Minute], band_bps: Iterable[int]) -> int:
    """Recompute ``book_minutes`` for these (venue, symbol, minute_us); returns rows upserted."""
    if not minutes:
        return 0
    args = {
        "venues": [m[0] for m in minutes],
        "symbols": [m[1] for m in minutes],
        "minutes": [m[2] for m in minutes],
        "bands": bands(band_bps),
    }
    cur.execute(_RECOMPUTE, args)
    upserted = cur.rowcount
    cur.execute(_DELETE_EMPTY, args)
    return upserted


def last_final_minute(now_us: int, grace_us: int) -> int:
    """The open time of the newest minute that closed at least ``grace_us`` ago."""
    return (now_us - grace_us) // MINUTE_US * MINUTE_US - MINUTE_US


def aggregate_final(conn, now_us: int, grace_us: int, band_bps: Iterable[int]) -> dict[str, int]:
    """Claim the dirty marks of final minutes and recompute those minutes, one
    transaction per ``CLAIM_BATCH`` marks, until none is left."""
    last = last_final_minute(now_us, grace_us)
    band_bps = bands(band_bps)
    out = {"minutes": 0, "rows": 0}
    while True:
        with conn, conn.cursor() as cur:
            cur.execute(_CLAIM, (last, CLAIM_BATCH))
            claimed = cur.fetchall()
            minutes = sorted(set(claimed))
            out["rows"] += recompute(cur, minutes, band_bps)
            out["minutes"] += len(minutes)
        if len(claimed) < CLAIM_BATCH:
            return out
