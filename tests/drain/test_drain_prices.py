"""drain_prices against the real Kafka and PostgreSQL: once in effect, whatever happens.

Each test uses its own topics, consumer name and PostgreSQL schema.
"""

from __future__ import annotations

import contextlib
import random
import threading
import uuid

import psycopg2
import pytest
from kafka import TopicPartition
from msgspec.structs import replace

from tasks.core import dlq
from tasks.core.kafka import consumer as kafka_consumer
from tasks.core.pg import connect
from tasks.core.topics import DLQ
from tasks.drain.migrate import MigrationError, available, migrate
from tests.drain.support import (
    drain_prices_now,
    pg_schema,
    price_state,
    publish,
    quotes,
    run_crashing,
    trades,
)


def _name() -> str:
    return f"test-drain-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def schema(postgres):
    with pg_schema(postgres.pg_dsn) as name:
        yield name


def test_migrations_apply_once_even_when_run_concurrently(postgres, tmp_path):
    name = f"t5_{uuid.uuid4().hex[:10]}"
    try:
        results: list[list[str]] = []
        threads = [
            threading.Thread(target=lambda: results.append(migrate(postgres.pg_dsn, name)))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        everything = [m.name for m in available()]
        assert sorted(results, key=len) == [[], [], everything]
        assert migrate(postgres.pg_dsn, name) == []
        with contextlib.closing(connect(postgres.pg_dsn, name)) as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM schema_migrations ORDER BY version")
            assert [r[0] for r in cur.fetchall()] == everything
        # history is fixed: an applied migration whose text changed is refused
        first = available()[0]
        (tmp_path / f"{first.name}.sql").write_text(first.sql + "\n-- edited\n")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            migrate(postgres.pg_dsn, name, folder=tmp_path)
    finally:
        with contextlib.closing(psycopg2.connect(postgres.pg_dsn)) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def test_duplicates_and_out_of_order_leave_one_row_per_trade(kafka, postgres, schema, new_topic):
    t_topic, q_topic = new_topic(3), new_topic(3)
    base = trades(3000)
    noisy = base + random.Random(1).sample(base, 500)  # re-sent trades ...
    noisy += [replace(t, recv_us=t.recv_us + 5) for t in base[:200]]  # ... seen twice
    random.Random(2).shuffle(noisy)  # and out of order
    qs = quotes(300)
    publish(kafka, t_topic, noisy)
    publish(kafka, q_topic, list(reversed(qs)) + qs[:50])
    consumer = _name()

    res = drain_prices_now(kafka, schema, consumer, [t_topic, q_topic], batch_size=700)

    assert res.stopped == "caught up"
    assert res.records == {t_topic: len(noisy), q_topic: 350}
    assert res.written.rows["trades"] == 3000
    assert res.written.duplicates["trades"] == 700
    assert res.written.rows["quotes"] == 300
    assert res.lag_by_topic() == {t_topic: 0, q_topic: 0}
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT (venue, symbol, trade_id)) FROM trades")
        assert cur.fetchone() == (3000, 3000)
        cur.execute("SELECT recv_us, price FROM trades WHERE trade_id = %s", (base[0].trade_id,))
        assert cur.fetchone() in {
            (base[0].recv_us, base[0].price),
            (base[0].recv_us + 5, base[0].price),
        }
        # the latest quote is the newest by event time, though it arrived first
        cur.execute("SELECT symbol, update_id FROM quotes_latest ORDER BY symbol")
        newest = {}
        for q in qs:
            newest[q.symbol] = max(newest.get(q.symbol, 0), q.update_id)
        assert dict(cur.fetchall()) == newest
        cur.execute("SELECT topic, sum(next_offset) FROM kafka_offsets GROUP BY topic")
        assert dict(cur.fetchall()) == {t_topic: len(noisy), q_topic: 350}

    again = drain_prices_now(kafka, schema, consumer, [t_topic, q_topic])
    assert again.records == {} and again.stopped == "caught up"


def test_bad_records_go_to_the_dlq_and_the_drain_goes_on(kafka, postgres, schema, new_topic):
    t_topic, q_topic = new_topic(1), new_topic(1)
    good = trades(20)
    bad = [
        (b"k", b"not json"),
        (b"k", b'{"v":1,"t":"trade","venue":"binance"}'),
        (b"k", b'{"v":1,"t":"trade","venue":"x","symbol":"A-B","venue_symbol":"AB",'
               b'"trade_id":1,"price":"-1","qty":"1","side":"buy","event_us":1,"recv_us":1}'),
        (b"k", b'{"v":1,"t":"tx","tx_id":"a","user_id":"u","symbol":"BTC-USDT","side":"buy",'
               b'"qty":"1","price":"1","fee":"0","status":"filled","event_us":1700000000000000}'),
    ]  # fmt: skip
    publish(kafka, t_topic, good[:10] + bad + good[10:])
    c = kafka_consumer(None, kafka, consumer_timeout_ms=3000)
    dlq_tp = [TopicPartition(DLQ, p) for p in c.partitions_for_topic(DLQ)]
    start = c.end_offsets(dlq_tp)

    res = drain_prices_now(kafka, schema, _name(), [t_topic, q_topic])

    assert res.rejects == {t_topic: 4}
    assert res.written.rows == {"trades": 20}
    assert res.lag_by_topic()[t_topic] == 0  # the offsets moved past the rejects
    c.assign(dlq_tp)
    for tp, off in start.items():
        c.seek(tp, off)
    mine = [d for d in (dlq.parse(r.value) for r in c) if d["context"].get("topic") == t_topic]
    c.close()
    assert sorted(d["raw"] for d in mine) == sorted(v for _, v in bad)
    reasons = " | ".join(d["reason"] for d in mine)
    for expected in ("not JSON", "symbol: missing", "must be > 0", "unexpected event type"):
        assert expected in reasons
    assert {d["source"] for d in mine} == {"test.drain.prices"}


def test_killed_between_database_and_kafka_commit_equals_a_clean_run(kafka, postgres, new_topic):
    t_topic, q_topic = new_topic(3), new_topic(2)
    publish(kafka, t_topic, trades(4000) + trades(300))  # with 300 re-sent trades
    publish(kafka, q_topic, quotes(400))
    topics = [t_topic, q_topic]
    with pg_schema(postgres.pg_dsn) as crashed, pg_schema(postgres.pg_dsn) as clean:
        consumer = _name()
        code = run_crashing("prices", crashed, consumer, topics, "after_db_commit:3", 500)
        assert code == 75, "the drain should have died at the fault point"
        # the window the fault opens: PostgreSQL is ahead of what Kafka was told
        with contextlib.closing(connect(postgres.pg_dsn, crashed)) as conn, conn.cursor() as cur:
            cur.execute("SELECT sum(next_offset) FROM kafka_offsets")
            stored = cur.fetchone()[0]
        c = kafka_consumer(consumer, kafka)
        parts = [TopicPartition(t, p) for t in topics for p in c.partitions_for_topic(t)]
        committed = sum(c.committed(tp) or 0 for tp in parts)
        c.close()
        assert 0 < committed < stored

        retry = drain_prices_now(kafka, crashed, consumer, topics, batch_size=500)
        assert retry.stopped == "caught up"
        assert sum(retry.records.values()) == 4700 - stored  # resumed where PostgreSQL was
        single = drain_prices_now(kafka, clean, _name(), topics, batch_size=500)
        assert single.written.rows["trades"] == 4000
        assert price_state(postgres.pg_dsn, crashed) == price_state(postgres.pg_dsn, clean)


def test_two_drains_on_disjoint_partitions_drain_in_parallel(kafka, postgres, schema, new_topic):
    t_topic, q_topic = new_topic(6), new_topic(1)
    publish(kafka, t_topic, trades(24_000))
    consumer, results = _name(), []

    def run(partitions: str) -> None:
        results.append(
            drain_prices_now(
                kafka, schema, consumer, [t_topic, q_topic], batch_size=25, partitions=partitions
            )
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in ("0-2", "3-5")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert len(results) == 2
    assert all(r.stopped == "caught up" for r in results)
    assert all(r.records.get(t_topic, 0) > 0 for r in results), [
        (r.records, r.seconds, r.stopped) for r in results
    ]
    assert sum(r.records.get(t_topic, 0) for r in results) == 24_000  # nothing read twice
    assert sum(r.written.rows.get("trades", 0) for r in results) == 24_000
    assert sum(r.written.duplicates.get("trades", 0) for r in results) == 0
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades")
        assert cur.fetchone() == (24_000, 24_000)
        cur.execute("SELECT sum(next_offset) FROM kafka_offsets WHERE topic = %s", (t_topic,))
        assert cur.fetchone() == (24_000,)


def test_two_drains_on_the_same_partitions_store_each_trade_once(
    kafka, postgres, schema, new_topic
):
    """An operator's extra run beside the scheduled one: both take every partition, the
    fence stops whichever writes from stale offsets, and it re-reads and goes on."""
    t_topic, q_topic = new_topic(3), new_topic(1)
    publish(kafka, t_topic, trades(9_000))
    consumer, results = _name(), []

    def run() -> None:
        results.append(drain_prices_now(kafka, schema, consumer, [t_topic, q_topic], batch_size=50))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.stopped for r in results] == ["caught up"] * 2, [r.records for r in results]
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades")
        assert cur.fetchone() == (9_000, 9_000)
        cur.execute("SELECT sum(next_offset) FROM kafka_offsets WHERE topic = %s", (t_topic,))
        assert cur.fetchone() == (9_000,)
