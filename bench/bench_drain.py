"""Drain throughput against the raw limits and the reference projects' method, one run.

Fills fresh topics with a backlog (trades, user transactions), then measures on the same
machine, one after the other:

- raw Kafka: kafka-python (the project's consumer settings) reading the trade topic,
  no decoding, no writes;
- raw COPY: the same trades, already as COPY lines, into a migrated ``trades`` table in
  the same batch size, one commit per batch, no Kafka;
- this drain: ``tasks.drain.loop`` with the PostgreSQL sink (decode, DLQ checks, staging
  COPY + INSERT, fenced offsets, SERIALIZABLE, Kafka commit), group join included;
- two such drains at once, each in its own process on half of the trade topic's six
  partitions (``partitions`` "0-2" and "3-5", as two deployments would split them);
- the reference projects' method on a sample: one INSERT and one COMMIT per message;
- the same for user transactions into MongoDB: raw ``insert_many`` of the documents,
  this drain (transactions + wallets + offsets), one ``insert_one`` per message.

Target: the trade drain at >= 70% of the slower raw limit.

    .venv/bin/python -m bench.bench_drain [--trades 1000000] [--transactions 200000]
        [--sample 2000] [--batch-size 20000] [--users 100]         # from the repo root
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import time
import uuid

import pymongo
from kafka import TopicPartition
from kafka.admin import NewTopic

from bench.cpu import SELF, Meter, per_message_us, service_pid
from tasks.core import config
from tasks.core.codec import encode
from tasks.core.kafka import admin, consumer, producer
from tasks.core.pg import connect
from tasks.drain.loop import drain
from tasks.drain.migrate import migrate
from tasks.drain.mongo import MongoSink, tx_document
from tasks.drain.postgres import PostgresSink, trade_line
from tests.drain.support import trades, transactions


class Cpu(dict):
    """CPU microseconds per row by process (this one, PostgreSQL, the broker), per step."""

    def __init__(self, settings: config.Settings):
        super().__init__()
        self.pids = {
            "python": SELF,
            "postgres": service_pid(settings, "postgres"),
            "kafka broker": service_pid(settings, "kafka"),
        }


def measured(name: str, rows: int, fn, cpu: Cpu):
    """Run fn, keep CPU microseconds per row by process for ``name``."""
    meter = Meter(cpu.pids)
    meter.start()
    result = fn()
    cpu[name] = per_message_us(meter.stop(), rows)
    return result


def _drain_part(schema: str, consumer_name: str, topic: str, partitions: str, batch: int):
    """One of the parallel drains (a child process): rows written and when it ended."""
    s = config.load()
    res = drain(
        PostgresSink(s.pg_dsn, schema), consumer_name, [topic], dlq_source="bench.drain",
        settings=s, batch_size=batch, max_seconds=3600, partitions=partitions,
    )  # fmt: skip
    return res.written.rows.get("trades", 0), time.perf_counter()


def parallel_drains(schema: str, consumer_name: str, topic: str, batch: int) -> float:
    """Two drains in two processes on disjoint partitions; rows/s over both, from the
    moment both were asked to start until the last one ended (start-up included)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        t0 = time.perf_counter()
        parts = [
            pool.apply_async(_drain_part, (schema, consumer_name, topic, p, batch))
            for p in ("0-2", "3-5")
        ]
        results = [p.get(timeout=3600) for p in parts]
    rows = sum(n for n, _ in results)
    return rows / (max(end for _, end in results) - t0), rows


def produce(settings, topic: str, events) -> float:
    p = producer(settings, linger_ms=20, batch_size=1024 * 1024)
    t0 = time.perf_counter()
    for e in events:
        p.send(topic, key=e.key.encode(), value=encode(e))
    p.flush(timeout=300)
    p.close()
    return len(events) / (time.perf_counter() - t0)


def raw_kafka(settings, topic: str, n: int) -> float:
    c = consumer(None, settings)
    tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic)]
    c.assign(tps)
    c.seek_to_beginning()
    got = 0
    t0 = time.perf_counter()
    while got < n:
        for recs in c.poll(timeout_ms=1000).values():
            got += len(recs)
    rate = got / (time.perf_counter() - t0)
    c.close()
    return rate


def raw_copy(dsn: str, schema: str, lines: list[bytes], batch: int) -> float:
    with contextlib.closing(connect(dsn, schema)) as conn, conn.cursor() as cur:
        t0 = time.perf_counter()
        for i in range(0, len(lines), batch):
            data = b"\n".join(lines[i : i + batch]) + b"\n"
            cur.copy_expert("COPY trades FROM STDIN", io.BytesIO(data), size=len(data))
            conn.commit()
        return len(lines) / (time.perf_counter() - t0)


def reference_prices(settings, schema: str, topic: str, sample: int) -> float:
    """cryptocurrency-platform style: decode, INSERT, COMMIT, per message."""
    c = consumer(None, settings, max_poll_records=500)
    c.assign([TopicPartition(topic, p) for p in c.partitions_for_topic(topic)])
    c.seek_to_beginning()
    sql = (
        "INSERT INTO trades (venue, symbol, venue_symbol, trade_id, price, qty, side,"
        " event_us, recv_us) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    fields = ("venue", "symbol", "venue_symbol", "trade_id", "price", "qty", "side")
    with contextlib.closing(connect(settings.pg_dsn, schema)) as conn, conn.cursor() as cur:
        done = 0
        t0 = time.perf_counter()
        while done < sample:
            for recs in c.poll(timeout_ms=1000, max_records=sample - done).values():
                for rec in recs:
                    d = json.loads(rec.value)
                    cur.execute(sql, [d[f] for f in fields] + [d["event_us"], d["recv_us"]])
                    conn.commit()
                    done += 1
        rate = done / (time.perf_counter() - t0)
    c.close()
    return rate


def reference_transactions(settings, database: str, topic: str, sample: int) -> float:
    c = consumer(None, settings, max_poll_records=500)
    c.assign([TopicPartition(topic, p) for p in c.partitions_for_topic(topic)])
    c.seek_to_beginning()
    client = pymongo.MongoClient(settings.mongo_url)
    coll = client[database].transactions
    done = 0
    t0 = time.perf_counter()
    while done < sample:
        for recs in c.poll(timeout_ms=1000, max_records=sample - done).values():
            for rec in recs:
                d = json.loads(rec.value)
                d["_id"] = d.pop("tx_id")
                coll.insert_one(d)
                done += 1
    rate = done / (time.perf_counter() - t0)
    c.close()
    client.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trades", type=int, default=1_000_000)
    ap.add_argument("--transactions", type=int, default=200_000)
    ap.add_argument("--sample", type=int, default=2_000)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--users", type=int, default=100)
    args = ap.parse_args()
    s = config.load()
    run = uuid.uuid4().hex[:8]
    t_topic, q_topic, x_topic = (f"bench.{k}.{run}" for k in ("trades", "quotes", "tx"))
    client = admin(s)
    client.create_topics(
        [NewTopic(t_topic, 6, 1), NewTopic(q_topic, 1, 1), NewTopic(x_topic, 6, 1)]
    )
    schemas = [f"bench_{k}_{run}" for k in ("copy", "drain", "ref", "two")]
    databases = [f"bench_{k}_{run}" for k in ("raw", "drain", "ref")]
    mongo = pymongo.MongoClient(s.mongo_url)
    out: list[tuple[str, float]] = []
    try:
        print(f"backlog: {args.trades:,} trades, {args.transactions:,} transactions", flush=True)
        ts = trades(args.trades)
        txs = transactions(args.users, args.transactions - args.users)
        print(f"  produced trades at {produce(s, t_topic, ts):,.0f}/s", flush=True)
        print(f"  produced transactions at {produce(s, x_topic, txs):,.0f}/s", flush=True)
        for schema in schemas:
            migrate(s.pg_dsn, schema)
        copy_lines = [trade_line(t) for t in ts]
        del ts

        cpu = Cpu(s)
        kafka_rate = measured(
            "raw kafka", args.trades, lambda: raw_kafka(s, t_topic, args.trades), cpu
        )
        out.append(("raw kafka-python consume, trades", kafka_rate))
        copy_rate = measured(
            "raw COPY",
            args.trades,
            lambda: raw_copy(s.pg_dsn, schemas[0], copy_lines, args.batch_size),
            cpu,
        )
        out.append(("raw COPY into trades, no Kafka", copy_rate))
        t0 = time.perf_counter()
        res = measured("drain", args.trades, lambda: drain(
            PostgresSink(s.pg_dsn, schemas[1]), f"bench-prices-{run}", [t_topic, q_topic],
            dlq_source="bench.drain", settings=s, batch_size=args.batch_size, max_seconds=3600,
        ), cpu)  # fmt: skip
        drain_rate = res.written.rows.get("trades", 0) / (time.perf_counter() - t0)
        assert res.written.rows.get("trades") == args.trades, res.written
        out.append(("this drain, trades -> PostgreSQL", drain_rate))
        two_rate, two_rows = parallel_drains(
            schemas[3], f"bench-two-{run}", t_topic, args.batch_size
        )
        assert two_rows == args.trades, two_rows
        out.append(("two drains at once (partitions 0-2, 3-5), trades", two_rate))
        out.append((f"reference: INSERT+COMMIT per message ({args.sample:,} sample)",
                    reference_prices(s, schemas[2], t_topic, args.sample)))  # fmt: skip

        raw_db = mongo[databases[0]].transactions
        docs = [tx_document(tx, x_topic, 0, i) for i, tx in enumerate(txs)]
        t0 = time.perf_counter()
        for i in range(0, len(docs), 20_000):
            raw_db.insert_many(docs[i : i + 20_000], ordered=False)
        out.append(
            ("raw insert_many of transactions, no Kafka", len(docs) / (time.perf_counter() - t0))
        )
        t0 = time.perf_counter()
        res = drain(
            MongoSink(s.mongo_url, databases[1]), f"bench-tx-{run}", [x_topic],
            dlq_source="bench.drain", settings=s, batch_size=args.batch_size, max_seconds=3600,
        )  # fmt: skip
        tx_rate = res.written.rows.get("transactions", 0) / (time.perf_counter() - t0)
        assert res.written.rows.get("transactions") == len(txs), res.written
        out.append(("this drain, transactions -> MongoDB (+wallets)", tx_rate))
        out.append((f"reference: insert_one per message ({args.sample:,} sample)",
                    reference_transactions(s, databases[2], x_topic, args.sample)))  # fmt: skip

        print(f"\n{'measure':56} {'rows/s':>10}")
        for name, rate in out:
            print(f"{name:56} {rate:>10,.0f}")
        slower = min(kafka_rate, copy_rate)
        print(f"\ntrade drain / slower raw limit: {drain_rate / slower:.0%} (target >= 70%)")
        print(f"two drains / one: {two_rate / drain_rate:.2f}x ({os.cpu_count()} cores)")
        print(f"\nCPU microseconds per trade ({os.cpu_count()} cores on this machine):")
        print(f"{'':12}" + "".join(f"{k:>14}" for k in cpu["drain"]) + f"{'sum':>10}")
        for name, per in cpu.items():
            cells = "".join(f"{v:>14.1f}" for v in per.values())
            print(f"{name:12}{cells}{sum(per.values()):>10.1f}")
    finally:
        with contextlib.closing(connect(s.pg_dsn)) as conn, conn.cursor() as cur:
            for schema in schemas:
                cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.commit()
        for name in databases:
            mongo.drop_database(name)
        mongo.close()
        with contextlib.suppress(Exception):
            client.delete_topics([t_topic, q_topic, x_topic])
        client.close()


if __name__ == "__main__":
    main()
