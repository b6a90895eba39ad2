"""Data, stores and a crashable drain process for the drain tests.

``python -m tests.drain.support prices|transactions ...`` runs one drain in its own
process, so a test can kill it at a chosen point with ``TAPELINE_DRAIN_FAULT``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import psycopg2
import pymongo

from tasks.core import config
from tasks.core.codec import encode
from tasks.core.events import BookUpdate, Quote, Trade, UserTransaction
from tasks.core.kafka import producer
from tasks.core.pg import connect, table_checksum
from tasks.drain.loop import DrainResult, drain
from tasks.drain.migrate import migrate
from tasks.drain.mongo import MongoSink
from tasks.drain.postgres import PostgresSink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "ADA-USDT", "BNB-USDT")


def now_us() -> int:
    return time.time_ns() // 1000


def trades(n: int, venue: str = "binance", start_id: int = 1) -> list[Trade]:
    t0 = now_us() - 3_600_000_000
    return [
        Trade(
            venue,
            s,
            s.replace("-", ""),
            start_id + i,
            Decimal(f"{100 + i % 977}.{i % 100:02d}"),
            Decimal(f"0.{i % 9999 + 1:04d}"),
            "buy" if i % 3 else "sell",
            t0 + i * 1000,
            t0 + i * 1000 + 700,
        )
        for i in range(n)
        for s in (SYMBOLS[i % len(SYMBOLS)],)
    ]


def quotes(n: int, venue: str = "binance") -> list[Quote]:
    t0 = now_us() - 3_600_000_000
    out = []
    for i in range(n):
        s = SYMBOLS[i % 3]
        bid = Decimal(f"{100 + i % 50}.{i % 10}")
        out.append(
            Quote(venue, s, s.replace("-", ""), 10_000 + i, bid, Decimal("1.5"),
                  bid + Decimal("0.1"), Decimal("2"), t0 + i * 1000, t0 + i * 1000 + 300)
        )  # fmt: skip
    return out


def books(n: int, venue: str = "binance", every: int = 5) -> list[BookUpdate]:
    """One book's events: a snapshot every ``every`` events (the first is one), deltas
    between them (seq one by one), 3 levels a side around 100."""
    t0 = now_us() - 3_600_000_000
    out = []
    for i in range(n):
        bid, ask = Decimal(100) - Decimal(i % 7) / 100, Decimal(101) + Decimal(i % 5) / 100
        if i % every == 0:
            bids = tuple((bid - k, Decimal(f"{k + 1}.5")) for k in range(3))
            asks = tuple((ask + k, Decimal(f"{k + 2}.25")) for k in range(3))
            kind = "snapshot"
        else:
            bids, asks, kind = ((bid, Decimal("0.1")),), (), "delta"
        out.append(BookUpdate(venue, "BTC-USDT", kind, i + 1, 3, bids, asks, t0 + i * 1000,
                              t0 + i * 1000 + 500))  # fmt: skip
    return out


def transactions(users: int, n: int, seed: int = 7) -> list[UserTransaction]:
    """Deposits first, then fills, cancels and rejects over two symbols."""
    rng = random.Random(seed)
    t0 = now_us() - 3_600_000_000
    out = [
        UserTransaction(f"dep-{u}", f"user-{u}", "USDT", "deposit", Decimal("100000"),
                        Decimal(1), Decimal(0), "filled", t0)
        for u in range(users)
    ]  # fmt: skip
    for i in range(n):
        side = rng.choice(("buy", "sell"))
        status = rng.choices(("filled", "cancelled", "rejected"), (8, 1, 1))[0]
        qty = Decimal(rng.randint(1, 5000)) / 10_000
        price = Decimal(rng.randint(2_000_000, 7_000_000)) / 100
        out.append(
            UserTransaction(f"tx-{i}", f"user-{i % users}", rng.choice(("BTC-USDT", "ETH-USDT")),
                            side, qty, price, (qty * price / 1000).quantize(Decimal("0.00000001")),
                            status, t0 + 1000 + i)
        )  # fmt: skip
    return out


def expected_balances(txs: list[UserTransaction]) -> dict[str, Decimal]:
    """The wallet rules written out independently of the sink, over distinct tx ids."""
    out: dict[str, Decimal] = {}
    seen = set()
    for tx in txs:
        if tx.tx_id in seen or tx.status != "filled":
            seen.add(tx.tx_id)
            continue
        seen.add(tx.tx_id)
        if tx.side == "deposit":
            moves = [(tx.symbol, tx.qty - tx.fee)]
        else:
            base, quote = tx.symbol.split("-")
            sign = 1 if tx.side == "buy" else -1
            moves = [(base, sign * tx.qty), (quote, -sign * tx.qty * tx.price - tx.fee)]
        for asset, delta in moves:
            key = f"{tx.user_id}:{asset}"
            out[key] = out.get(key, Decimal(0)) + delta
    return out


def publish(settings: config.Settings, topic: str, items: list) -> None:
    """Events (encoded, keyed) or raw ``(key, value)`` pairs, acknowledged in order."""
    p = producer(settings)
    try:
        for item in items:
            if isinstance(item, tuple):
                p.send(topic, key=item[0], value=item[1])
            else:
                p.send(topic, key=item.key.encode(), value=encode(item))
        p.flush(timeout=60)
    finally:
        p.close(timeout=10)


@contextlib.contextmanager
def pg_schema(dsn: str) -> Iterator[str]:
    """A fresh, migrated schema, dropped afterwards."""
    schema = f"t5_{uuid.uuid4().hex[:10]}"
    migrate(dsn, schema)
    try:
        yield schema
    finally:
        with contextlib.closing(psycopg2.connect(dsn)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def price_state(dsn: str, schema: str) -> dict[str, tuple[int, str]]:
    """Row count and content checksum of every price table."""
    with contextlib.closing(connect(dsn, schema)) as conn:
        return {
            "trades": table_checksum(conn, "trades", "venue, symbol, trade_id"),
            "quotes": table_checksum(conn, "quotes", "venue, symbol, event_us, recv_us"),
            "quotes_latest": table_checksum(conn, "quotes_latest", "venue, symbol"),
        }


def mongo_state(db) -> dict[str, tuple[int, str]]:
    """Count and checksum of transactions and wallet balances (versions and offsets
    differ between a clean run and a crashed one by design: they say how it got there)."""
    tx = sorted(repr(sorted(d.items())) for d in db.transactions.find({}))
    wallets = sorted(
        f"{d['_id']}={Decimal(d['balance'])}" for d in db.wallets.find({}, {"balance": 1})
    )
    return {
        name: (len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest())
        for name, rows in (("transactions", tx), ("wallets", wallets))
    }


def prices_sink(settings: config.Settings, schema: str) -> PostgresSink:
    return PostgresSink(settings.pg_dsn, schema, retry_seconds=30)


def drain_prices_now(settings, schema, consumer, topics, **kw) -> DrainResult:
    kw.setdefault("max_seconds", 25)
    return drain(
        prices_sink(settings, schema), consumer, topics, dlq_source="test.drain.prices",
        settings=settings, **kw,
    )  # fmt: skip


def drain_transactions_now(settings, database, consumer, topic, **kw) -> DrainResult:
    kw.setdefault("max_seconds", 25)
    return drain(
        MongoSink(settings.mongo_url, database, retry_seconds=30), consumer, [topic],
        dlq_source="test.drain.transactions", settings=settings, **kw,
    )  # fmt: skip


def run_crashing(kind: str, target: str, consumer: str, topics: list[str], fault: str,
                 batch_size: int, env: dict[str, str] | None = None) -> int:  # fmt: skip
    """Run one drain in a child process that dies at ``fault``; returns its exit code."""
    cmd = [sys.executable, "-m", "tests.drain.support", kind, target, consumer, *topics,
           "--batch-size", str(batch_size)]  # fmt: skip
    child_env = {**(env or os.environ), "TAPELINE_DRAIN_FAULT": fault, "PYTHONPATH": ROOT}
    res = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, timeout=60)
    if res.returncode not in (0, 75):
        raise AssertionError(res.stderr.decode()[-3000:])
    return res.returncode


def store_books(dsn: str, schema: str, events: list[BookUpdate]) -> dict[str, int]:
    """Write book events through the price drain's batch and sink, as records of one
    partition of a topic no other call uses (no Kafka); returns the rows written."""
    from types import SimpleNamespace

    topic = f"books.{uuid.uuid4().hex[:8]}"
    recs = [SimpleNamespace(topic=topic, partition=0, offset=i, value=encode(e))
            for i, e in enumerate(events)]  # fmt: skip
    sink = PostgresSink(dsn, schema, retry_seconds=10)
    try:
        batch = sink.open_batch()
        rejects = batch.add(topic, 0, recs)
        assert rejects == [], rejects
        return sink.write(f"test-{topic}", batch, {(topic, 0): (None, len(recs))}).rows
    finally:
        sink.close()


def mongo_client(settings: config.Settings) -> pymongo.MongoClient:
    return pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=5000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["prices", "transactions"])
    ap.add_argument("target", help="PostgreSQL schema or MongoDB database")
    ap.add_argument("consumer")
    ap.add_argument("topics", nargs="+")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    settings = config.load()
    if args.kind == "prices":
        drain_prices_now(
            settings, args.target, args.consumer, args.topics, batch_size=args.batch_size
        )
    else:
        drain_transactions_now(
            settings, args.target, args.consumer, args.topics[0], batch_size=args.batch_size
        )


if __name__ == "__main__":
    main()
