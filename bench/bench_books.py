"""Which storage shape for order-book snapshots: one row per snapshot, or one per level.

Synthetic snapshots as ingestion publishes them: ``--symbols`` books (default 5), one
snapshot a second each, ``--depth`` levels a side (default 20), prices on a tick with
some levels missing, quantities with 8 decimals, all exact. Both shapes are created in a
scratch schema of the configured PostgreSQL (``TAPELINE_PG_DSN``) and dropped afterwards:

- snapshot rows: ``(venue, symbol, event_us, seq, depth, recv_us, bid_prices numeric[],
  bid_qtys numeric[], ask_prices numeric[], ask_qtys numeric[])``, key (venue, symbol,
  event_us);
- level rows: ``(venue, symbol, event_us, side, level, price, qty)``, key (venue, symbol,
  event_us, side, level), plus the snapshot's seq, depth, recv_us on every level.

For each: Python CPU to build the COPY lines, COPY rate (staged like the drain: COPY
into a temporary table, ``INSERT ... SELECT``, one commit per ``--batch`` snapshots),
size on disk (``pg_total_relation_size`` after VACUUM ANALYZE), and the latency of the
two reads (median and 95th percentile over ``--queries`` random times): the book at a
time T for one symbol, and an hour's spread/mid/depth history for one symbol. Prints the
numbers; never aborts on a slow or odd result.

Then, in the shape chosen (migration 0700), the per-minute aggregation of every minute
the snapshots touched (``tasks.analytics.books``, bands 10 and 50 bps), timed.

    TAPELINE_PG_DSN=... .venv/bin/python -m bench.bench_books [--snapshots 50000]
        [--symbols 5] [--depth 20] [--batch 2000] [--queries 200]        # from the repo root
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from tasks.analytics import books as book_minutes
from tasks.core import config
from tasks.core.pg import connect
from tasks.drain.migrate import migrate

T0 = 1_790_000_000_000_000  # epoch microseconds
STEP_US = 1_000_000  # one snapshot a second per book
HOUR_US = 3_600_000_000
VENUE = "binance"


@dataclass(frozen=True)
class Snap:
    symbol: str
    event_us: int
    seq: int
    bids: list[tuple[str, str]]  # price, qty as written on the wire: 8 decimals
    asks: list[tuple[str, str]]


def synthetic(n: int, symbols: int, depth: int, seed: int = 7) -> list[Snap]:
    """Round-robin over the symbols, time ascending: a random walk of the mid per book in
    ticks of 0.01, levels one to three ticks apart, quantities 1e-8 .. 50."""
    rnd = random.Random(seed)
    names = [f"S{i}-USDT" for i in range(symbols)]
    mids = [6_400_000 + 100_000 * i for i in range(symbols)]  # in ticks of 0.01
    eight = Decimal("0.00000001")
    out = []
    for i in range(n):
        s = i % symbols
        mids[s] = max(1_000, mids[s] + rnd.randint(-3, 3))
        bid, ask = mids[s] - rnd.randint(0, 2), mids[s] + 1 + rnd.randint(0, 2)
        bids, asks = [], []
        for _ in range(depth):
            bids.append((f"{Decimal(bid) / 100:.8f}", f"{rnd.randint(1, 5_000_000_000) * eight}"))
            asks.append((f"{Decimal(ask) / 100:.8f}", f"{rnd.randint(1, 5_000_000_000) * eight}"))
            bid -= rnd.randint(1, 3)
            ask += rnd.randint(1, 3)
        out.append(Snap(names[s], T0 + (i // symbols) * STEP_US, i // symbols, bids, asks))
    return out


# --- the two shapes --------------------------------------------------------------------
SNAPSHOT_DDL = """
CREATE TABLE snaps (
    venue text NOT NULL, symbol text NOT NULL, event_us bigint NOT NULL,
    seq bigint NOT NULL, depth smallint NOT NULL, recv_us bigint NOT NULL,
    bid_prices numeric[] NOT NULL, bid_qtys numeric[] NOT NULL,
    ask_prices numeric[] NOT NULL, ask_qtys numeric[] NOT NULL,
    PRIMARY KEY (venue, symbol, event_us))
"""
LEVEL_DDL = """
CREATE TABLE levels (
    venue text NOT NULL, symbol text NOT NULL, event_us bigint NOT NULL,
    side "char" NOT NULL, level smallint NOT NULL, price numeric NOT NULL,
    qty numeric NOT NULL, seq bigint NOT NULL, depth smallint NOT NULL, recv_us bigint NOT NULL,
    PRIMARY KEY (venue, symbol, event_us, side, level))
"""


def snapshot_lines(s: Snap) -> list[bytes]:
    def arr(xs) -> str:
        return "{" + ",".join(xs) + "}"

    return [
        (
            f"{VENUE}\t{s.symbol}\t{s.event_us}\t{s.seq}\t{len(s.bids)}\t{s.event_us + 900}\t"
            f"{arr(p for p, _ in s.bids)}\t{arr(q for _, q in s.bids)}\t"
            f"{arr(p for p, _ in s.asks)}\t{arr(q for _, q in s.asks)}"
        ).encode()
    ]


def level_lines(s: Snap) -> list[bytes]:
    head = f"{VENUE}\t{s.symbol}\t{s.event_us}\t"
    tail = f"\t{s.seq}\t{len(s.bids)}\t{s.event_us + 900}"
    return [
        f"{head}{side}\t{i}\t{p}\t{q}{tail}".encode()
        for side, levels in (("b", s.bids), ("a", s.asks))
        for i, (p, q) in enumerate(levels, 1)
    ]


# Reads: (book at T, spread history over [start, end)), each with the symbol as %(s)s.
SNAPSHOT_READS = (
    """SELECT event_us, seq, bid_prices, bid_qtys, ask_prices, ask_qtys FROM snaps
       WHERE venue = %(v)s AND symbol = %(s)s AND event_us <= %(t)s
       ORDER BY event_us DESC LIMIT 1""",
    """SELECT event_us, bid_prices[1], ask_prices[1], ask_prices[1] - bid_prices[1],
              (ask_prices[1] + bid_prices[1]) / 2,
              (SELECT sum(q) FROM unnest(bid_qtys) q), (SELECT sum(q) FROM unnest(ask_qtys) q)
       FROM snaps WHERE venue = %(v)s AND symbol = %(s)s
       AND event_us >= %(t)s AND event_us < %(t)s + 3600000000 ORDER BY event_us""",
)
LEVEL_READS = (
    """SELECT side, level, price, qty FROM levels
       WHERE venue = %(v)s AND symbol = %(s)s AND event_us = (
           SELECT event_us FROM levels WHERE venue = %(v)s AND symbol = %(s)s
           AND event_us <= %(t)s ORDER BY event_us DESC LIMIT 1)
       ORDER BY side DESC, level""",
    """SELECT event_us, bid, ask, ask - bid, (ask + bid) / 2, bid_depth, ask_depth FROM (
         SELECT event_us,
                min(price) FILTER (WHERE side = 'b' AND level = 1) AS bid,
                min(price) FILTER (WHERE side = 'a' AND level = 1) AS ask,
                sum(qty) FILTER (WHERE side = 'b') AS bid_depth,
                sum(qty) FILTER (WHERE side = 'a') AS ask_depth
         FROM levels WHERE venue = %(v)s AND symbol = %(s)s
         AND event_us >= %(t)s AND event_us < %(t)s + 3600000000
         GROUP BY event_us) h ORDER BY event_us""",
)


@dataclass
class Result:
    shape: str
    rows: int = 0
    build_s: float = 0.0
    copy_s: float = 0.0
    bytes: int = 0
    at_ms: list[float] = field(default_factory=list)
    history_ms: list[float] = field(default_factory=list)
    history_rows: int = 0


def store(cur, conn, table: str, lines: list[list[bytes]], batch: int) -> float:
    """Drain-style: per batch of snapshots, COPY into a staging table, INSERT ... SELECT,
    commit. Returns seconds."""
    cur.execute(f"CREATE TEMP TABLE stage_{table} (LIKE {table}) ON COMMIT DELETE ROWS")
    conn.commit()
    t0 = time.perf_counter()
    for i in range(0, len(lines), batch):
        data = b"\n".join(line for snap in lines[i : i + batch] for line in snap) + b"\n"
        cur.copy_expert(f"COPY stage_{table} FROM STDIN", io.BytesIO(data), size=len(data))
        cur.execute(f"INSERT INTO {table} SELECT * FROM stage_{table} ON CONFLICT DO NOTHING")
        conn.commit()
    return time.perf_counter() - t0


def timed(cur, query: str, args: dict) -> tuple[float, int]:
    t0 = time.perf_counter()
    cur.execute(query, args)
    n = len(cur.fetchall())
    return (time.perf_counter() - t0) * 1000, n


def measure(conn, shape: str, snaps: list[Snap], a: argparse.Namespace) -> Result:
    ddl, build, reads, table = {
        "snapshot rows": (SNAPSHOT_DDL, snapshot_lines, SNAPSHOT_READS, "snaps"),
        "level rows": (LEVEL_DDL, level_lines, LEVEL_READS, "levels"),
    }[shape]
    r = Result(shape)
    cur = conn.cursor()
    cur.execute(ddl)
    conn.commit()
    t0 = time.process_time()
    lines = [build(s) for s in snaps]
    r.build_s = time.process_time() - t0
    r.rows = sum(len(x) for x in lines)
    r.copy_s = store(cur, conn, table, lines, a.batch)
    del lines
    conn.autocommit = True
    cur.execute(f"VACUUM ANALYZE {table}")
    conn.autocommit = False
    cur.execute("SELECT pg_total_relation_size(%s)", (table,))
    r.bytes = cur.fetchone()[0]
    span = snaps[-1].event_us - T0
    rnd = random.Random(11)
    symbols = sorted({s.symbol for s in snaps})
    for _ in range(a.queries):
        args = {"v": VENUE, "s": rnd.choice(symbols), "t": T0 + rnd.randrange(span)}
        r.at_ms.append(timed(cur, reads[0], args)[0])
    for _ in range(max(1, a.queries // 10)):
        start = T0 + rnd.randrange(max(1, span - HOUR_US))
        ms, n = timed(cur, reads[1], {"v": VENUE, "s": rnd.choice(symbols), "t": start})
        r.history_ms.append(ms)
        r.history_rows = max(r.history_rows, n)
    conn.rollback()
    return r


def aggregate_minutes(dsn: str, snaps: list[Snap], a: argparse.Namespace) -> None:
    """Store the snapshots in the migrated table (its trigger marks the minutes), then
    time aggregating every minute they touched."""
    schema = f"bench_minutes_{uuid.uuid4().hex[:8]}"
    migrate(dsn, schema)
    try:
        with contextlib.closing(connect(dsn, schema)) as conn, conn.cursor() as cur:
            lines = [line for s in snaps for line in snapshot_lines(s)]
            for i in range(0, len(lines), a.batch):
                data = b"\n".join(lines[i : i + a.batch]) + b"\n"
                cur.copy_expert("COPY book_snapshots FROM STDIN", io.BytesIO(data), size=len(data))
                conn.commit()
            t0 = time.perf_counter()
            now_us = snaps[-1].event_us + 2 * book_minutes.MINUTE_US
            out = book_minutes.aggregate_final(conn, now_us, 0, [10, 50])
            secs = time.perf_counter() - t0
        print(
            f"\nbook_minutes: {out['minutes']:,} minutes x 2 bands from {len(snaps):,} snapshots"
            f" in {secs:.2f} s ({len(snaps) / secs:,.0f} snapshots/s)"
        )
    finally:
        with contextlib.closing(connect(dsn)) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.commit()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", type=int, default=50_000)
    p.add_argument("--symbols", type=int, default=5)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch", type=int, default=2_000, help="snapshots per transaction")
    p.add_argument("--queries", type=int, default=200)
    a = p.parse_args(argv)
    dsn = config.load().pg_dsn
    t0 = time.perf_counter()
    snaps = synthetic(a.snapshots, a.symbols, a.depth)
    hours = (snaps[-1].event_us - T0) / HOUR_US
    print(
        f"{len(snaps):,} snapshots, {a.symbols} books x {hours:.1f} h, {a.depth} levels a side"
        f" (built in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    schema = f"bench_books_{uuid.uuid4().hex[:8]}"
    results = []
    try:
        with contextlib.closing(connect(dsn, schema, create_schema=True)) as conn:
            for shape in ("snapshot rows", "level rows"):
                try:
                    results.append(measure(conn, shape, snaps, a))
                except Exception as e:  # a benchmark reports, it does not abort
                    conn.rollback()
                    print(f"{shape}: failed: {type(e).__name__}: {e}", flush=True)
    finally:
        with contextlib.closing(connect(dsn)) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.commit()
    n = len(snaps)
    print(
        f"\n{'shape':14} {'rows':>10} {'py us/snap':>10} {'snap/s':>8} {'rows/s':>9}"
        f" {'MiB':>7} {'B/snap':>7} {'at T ms p50/p95':>16} {'1 h ms p50/p95':>16}"
    )
    for r in results:
        print(
            f"{r.shape:14} {r.rows:>10,} {r.build_s / n * 1e6:>10.1f} {n / r.copy_s:>8,.0f}"
            f" {r.rows / r.copy_s:>9,.0f} {r.bytes / 2**20:>7.1f} {r.bytes / n:>7,.0f}"
            f" {statistics.median(r.at_ms):>7.2f}/{pct(r.at_ms, 0.95):<8.2f}"
            f" {statistics.median(r.history_ms):>7.1f}/{pct(r.history_ms, 0.95):<8.1f}"
        )
    if results:
        print(
            f"\n1 h history: {results[0].history_rows:,} snapshots a query; py us/snap: CPU to"
            " build the COPY lines; snap/s, rows/s: staged COPY + INSERT, committed"
        )
    try:
        aggregate_minutes(dsn, snaps, a)
    except Exception as e:  # a benchmark reports, it does not abort
        print(f"book_minutes: failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
