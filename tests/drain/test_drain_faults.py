"""Drains against data and logs nobody planned for, on the real Kafka, PostgreSQL and
MongoDB protocol: records the database refuses are dead-lettered while the rest lands,
stored offsets outside the log fail loudly (or skip, counted, when allowed), and a
recreated topic is refused until an operator accepts it.
"""

from __future__ import annotations

import contextlib
import random
import string
import threading
import time
import uuid
from decimal import Decimal

import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic
from msgspec.structs import replace

from tasks.core import dlq
from tasks.core.codec import encode
from tasks.core.events import UserTransaction
from tasks.core.kafka import admin
from tasks.core.kafka import consumer as kafka_consumer
from tasks.core.pg import connect
from tasks.core.topics import DLQ
from tasks.core.wallets import effects, fold_transactions, wallet_balances
from tasks.drain.contract import Rejected
from tasks.drain.loop import OffsetOutOfLog, parse_partitions
from tasks.drain.migrate import migrate
from tasks.drain.mongo import MongoSink, TxBatch
from tasks.drain.postgres import PriceBatch
from tests.drain.support import (
    drain_prices_now,
    drain_transactions_now,
    pg_schema,
    prices_sink,
    publish,
    trades,
    transactions,
)


def _name() -> str:
    return f"test-faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def schema(postgres):
    with pg_schema(postgres.pg_dsn) as name:
        yield name


def _dlq_after(kafka, start: dict, topic: str) -> list[dict]:
    """DLQ records about ``topic`` written after ``start`` (the DLQ's end offsets)."""
    c = kafka_consumer(None, kafka, consumer_timeout_ms=3000)
    c.assign(list(start))
    for tp, off in start.items():
        c.seek(tp, off)
    out = [d for d in (dlq.parse(r.value) for r in c) if d["context"].get("topic") == topic]
    c.close()
    return out


def _dlq_ends(kafka) -> dict:
    c = kafka_consumer(None, kafka)
    tps = [TopicPartition(DLQ, p) for p in c.partitions_for_topic(DLQ)]
    ends = c.end_offsets(tps)
    c.close()
    return ends


class _Rec:
    """A consumed record as the sinks see it, for the sink-level tests."""

    def __init__(self, offset: int, value: bytes = b"{}"):
        self.topic, self.partition, self.offset, self.value = "t", 0, offset, value


def test_the_sink_isolates_rows_postgres_refuses_and_writes_nothing(postgres, schema):
    """A 3,000-character symbol (random, so it does not compress) passes COPY but not the
    primary key's btree (SQLSTATE 54, which psycopg2 raises as OperationalError, the class
    of a lost connection), and a negative price breaks a CHECK (23): each is named with
    its reason, by bisection."""
    good = trades(40)
    batch = PriceBatch()
    assert batch.add("t", 0, [_Rec(i, encode(t)) for i, t in enumerate(good)]) == []
    n = len(batch.trades)
    symbol = "".join(random.Random(7).choices(string.ascii_uppercase, k=3000)).encode()
    times = [str(good[0].event_us).encode(), str(good[0].recv_us).encode()]
    huge = b"\t".join([b"binance", symbol + b"-USDT", b"XUSDT", b"1", b"1", b"1", b"buy", *times])
    negative = batch.trades[3].replace(b"\t" + str(good[3].price).encode() + b"\t", b"\t-1\t", 1)
    assert negative != batch.trades[3]
    poison = {n + 0: huge, n + 1: negative}
    for offset, line in poison.items():
        batch.trades.append(line)
        batch.trade_records.append(_Rec(offset))
    sink = prices_sink(postgres, schema)
    try:
        with pytest.raises(Rejected) as caught:
            sink.write("sink-test", batch, {("t", 0): (None, n + 2)})
        refused = {rec.offset: why for rec, why in caught.value.records}
        assert sorted(refused) == [n, n + 1]
        assert "54000" in refused[n] and "index row size" in refused[n]
        assert "23514" in refused[n + 1]  # check_violation
        with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trades")
            assert cur.fetchone() == (0,), "a rejected batch writes nothing"
        batch.drop([rec for rec, _ in caught.value.records])
        written = sink.write("sink-test", batch, {("t", 0): (None, n + 2)})
        assert written.rows == {"trades": 40}
    finally:
        sink.close()


def test_a_lost_writer_connection_leaves_the_side_connection_alone(postgres, schema):
    """The writer thread reconnects after its connection is lost; the main thread's side
    connection (offsets, the handover generation) may be mid-read then, so it stays open."""
    sink = prices_sink(postgres, schema)
    try:
        batch = PriceBatch()
        assert batch.add("t", 0, [_Rec(i, encode(t)) for i, t in enumerate(trades(10))]) == []
        sink.write("sink-test", batch, {("t", 0): (None, 10)})
        assert sink.take_over("sink-test") == 1
        side = sink._side_conn
        with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (sink._conn.get_backend_pid(),))
                assert cur.fetchone() == (True,), "could not end the writer's backend"
        batch = PriceBatch()
        more = trades(10, start_id=11)
        assert batch.add("t", 0, [_Rec(10 + i, encode(t)) for i, t in enumerate(more)]) == []
        assert sink.write("sink-test", batch, {("t", 0): (10, 20)}).rows == {"trades": 10}
        assert sink._side_conn is side and not side.closed, "the side connection was closed"
        assert sink.generation("sink-test") == 1
    finally:
        sink.close()


def test_a_record_the_database_refuses_goes_to_the_dlq_and_the_rest_lands(
    kafka, postgres, schema, new_topic
):
    """End to end through the loop: the schema refuses one symbol (a CHECK added for the
    test, so the record passes the codec); it is dead-lettered with PostgreSQL's reason,
    the other trades of its batch are stored, the offsets pass it, nothing is retried."""
    t_topic, q_topic = new_topic(1), new_topic(1)
    migrate(postgres.pg_dsn, schema)
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE trades ADD CONSTRAINT no_poison CHECK (symbol <> 'POI-SON')")
    good = trades(30)
    bad = replace(trades(1, start_id=10_000)[0], symbol="POI-SON")
    publish(kafka, t_topic, [*good[:15], bad, *good[15:]])
    start = _dlq_ends(kafka)
    res = drain_prices_now(kafka, schema, _name(), [t_topic, q_topic])
    assert res.stopped == "caught up"
    assert res.rejects == {t_topic: 1}
    assert res.written.rows.get("trades") == 30
    assert res.lag_by_topic()[t_topic] == 0
    mine = _dlq_after(kafka, start, t_topic)
    assert len(mine) == 1
    assert "POI-SON" in mine[0]["raw"].decode() and "23514" in mine[0]["reason"]


def test_a_stored_offset_below_the_log_start_fails_loudly_or_skips_counted(
    kafka, postgres, schema, new_topic
):
    t_topic, q_topic = new_topic(1), new_topic(1)
    publish(kafka, t_topic, trades(100))
    name = _name()
    first = drain_prices_now(kafka, schema, name, [t_topic, q_topic], max_records=40,
                             batch_size=40)  # fmt: skip
    assert first.written.rows.get("trades") == 40
    client = admin(kafka)
    try:
        client.delete_records({TopicPartition(t_topic, 0): 70})  # retention, in effect
    finally:
        client.close()
    with pytest.raises(
        OffsetOutOfLog, match=rf"{t_topic}\[0\]: stored offset 40, log 70\.\.100"
    ):
        drain_prices_now(kafka, schema, name, [t_topic, q_topic])
    res = drain_prices_now(kafka, schema, name, [t_topic, q_topic], allow_gaps=True)
    assert res.gaps == {(t_topic, 0): 30}
    assert res.written.rows.get("trades") == 30
    assert res.lag_by_topic()[t_topic] == 0


def test_a_stored_offset_beyond_the_log_end_fails_loudly(kafka, postgres, schema, new_topic):
    t_topic, q_topic = new_topic(1), new_topic(1)
    publish(kafka, t_topic, trades(10))
    name = _name()
    drain_prices_now(kafka, schema, name, [t_topic, q_topic])
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute("UPDATE kafka_offsets SET next_offset = 5000 WHERE topic = %s", (t_topic,))
        conn.commit()
    for allow_gaps in (False, True):  # skipping cannot make sense of offsets from elsewhere
        with pytest.raises(OffsetOutOfLog, match=r"stored offset 5000, log 0\.\.10: beyond the"):
            drain_prices_now(kafka, schema, name, [t_topic, q_topic], allow_gaps=allow_gaps)


def _recreate(kafka, topic: str, partitions: int) -> None:
    client = admin(kafka)
    try:
        client.delete_topics([topic])
        deadline = time.monotonic() + 60
        while True:  # deletion is asynchronous: create again once the name is free
            try:
                client.create_topics([NewTopic(topic, partitions, 1)])
                break
            except Exception:
                assert time.monotonic() < deadline, f"{topic} was not deleted within 60 s"
                time.sleep(0.5)
        client.wait_for_topics([topic])
    finally:
        client.close()


def test_a_recreated_topic_is_refused_until_the_operator_resets(
    kafka, postgres, schema, new_topic
):
    t_topic, q_topic = new_topic(1), new_topic(1)
    publish(kafka, t_topic, trades(50))
    name = _name()
    assert drain_prices_now(kafka, schema, name, [t_topic, q_topic]).written.rows["trades"] == 50
    _recreate(kafka, t_topic, 1)
    publish(kafka, t_topic, trades(20, start_id=1000))  # offsets 0..19 again, below 50
    with pytest.raises(OffsetOutOfLog, match="recreated or this is another cluster"):
        drain_prices_now(kafka, schema, name, [t_topic, q_topic])
    res = drain_prices_now(kafka, schema, name, [t_topic, q_topic], reset_log=True)
    assert res.written.rows.get("trades") == 20
    again = drain_prices_now(kafka, schema, name, [t_topic, q_topic])
    assert again.stopped == "caught up" and again.written.rows == {}


def test_wallets_keep_moving_after_a_recreated_transactions_topic(kafka, mongo_db, new_topic):
    """The wallets' applied marks are per stream; after a reset the new log's offsets
    (from 0 again) are a new stream, so its effects apply, and nothing applies twice."""
    topic = new_topic(1)
    before, after = transactions(users=5, n=200, seed=11), transactions(users=5, n=100, seed=12)
    after = [replace(t, tx_id=f"{t.tx_id}-new") for t in after]
    publish(kafka, topic, before)
    name = _name()
    drain_transactions_now(kafka, mongo_db.name, name, topic)
    _recreate(kafka, topic, 1)
    publish(kafka, topic, after)
    with pytest.raises(OffsetOutOfLog):
        drain_transactions_now(kafka, mongo_db.name, name, topic)
    res = drain_transactions_now(kafka, mongo_db.name, name, topic, reset_log=True)
    assert res.stopped == "caught up"
    assert mongo_db.transactions.count_documents({}) == len({t.tx_id for t in [*before, *after]})
    assert wallet_balances(mongo_db) == fold_transactions(mongo_db)


def test_an_effect_that_cannot_stay_exact_is_refused_and_nothing_moves(mongo, mongo_db):
    """Sink level (the codec's limits keep such amounts off Kafka): a deposit that would
    carry a balance past the exact context is refused with its reason, its transaction
    document is removed again, and the batch without it lands with wallets equal to the
    fold of the stored transactions."""
    deposit = next(t for t in transactions(users=1, n=20, seed=21) if t.side == "deposit")
    tiny = replace(deposit, tx_id="tiny", qty=Decimal("1E-45"), fee=Decimal(0))
    huge = replace(deposit, tx_id="huge", qty=Decimal("1" + "0" * 60), fee=Decimal(0))
    batch = TxBatch()
    for offset, tx in enumerate([tiny, huge]):
        batch.items.append((tx, effects(tx), "t", 0, offset))
        batch.records.append(_Rec(offset))
    sink = MongoSink(mongo.mongo_url, mongo_db.name, retry_seconds=10)
    try:
        with pytest.raises(Rejected) as caught:
            sink.write("sink-test", batch, {("t", 0): (None, 2)})
        assert [(r.offset, why) for r, why in caught.value.records] == [
            (1, "mongo refused the transaction: a balance it moves cannot stay exact")
        ]
        assert mongo_db.transactions.count_documents({"_id": "huge"}) == 0
        batch.drop([r for r, _ in caught.value.records])
        sink.write("sink-test", batch, {("t", 0): (None, 2)})
    finally:
        sink.close()
    assert sorted(d["_id"] for d in mongo_db.transactions.find({})) == ["tiny"]
    assert wallet_balances(mongo_db) == fold_transactions(mongo_db)


def test_the_newest_wallet_version_is_found_by_id_even_past_pruned_ones(mongo, mongo_db):
    """Versions are looked up by ``_id`` upwards from the one ``wallets`` shows; a wallet
    whose shown version and those after it were pruned, or one never shown, is still
    placed (by the scan it falls back to), and the newest is never a superseded one."""
    wid = "user-1:USDT"
    for v in range(1, 12):
        doc = {"_id": f"{wid}#{v}", "wid": wid, "v": v, "balance": str(v)}
        mongo_db.wallet_versions.insert_one(doc | ({"superseded": True} if v < 11 else {}))
    mongo_db.wallets.insert_one({"_id": wid, "v": 2, "balance": "2"})
    sink = MongoSink(mongo.mongo_url, mongo_db.name, retry_seconds=10)
    try:
        assert sink._newest([wid])[wid]["v"] == 11  # probed upwards in rounds from #2
        mongo_db.wallet_versions.delete_many({"v": {"$lt": 9}})  # pruned past what it shows
        assert sink._newest([wid])[wid]["v"] == 11
        mongo_db.wallets.delete_one({"_id": wid})  # never shown: found all the same
        assert sink._newest([wid])[wid]["v"] == 11
        assert sink._newest(["user-2:BTC"]) == {}  # a new wallet has no version
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, None), ("", None), ("0-2,5", {0, 1, 2, 5}), ([3, 1], {1, 3}), ("4", {4})],
)
def test_partition_sets(spec, expected):
    assert parse_partitions(spec) == expected


@pytest.mark.parametrize("spec", ["a", "1-", "-1", "2-x", []])
def test_bad_partition_sets_name_the_parameter(spec):
    with pytest.raises(ValueError, match="partitions"):
        parse_partitions(spec)


def test_concurrent_writers_of_one_wallet_lose_no_effect(mongo, mongo_db):
    """FerretDB matches an update's filter and writes by ``_id`` in two steps, so with an
    update-based compare-and-set both of two racing writers can win (probed here: four
    threads, 1,200 successful compare-and-set updates, a counter left at 444). Four
    sinks write one wallet at once, each its own partition's deposits: every one counts."""
    per_partition, partitions = 40, 4

    def write(partition: int) -> None:
        sink = MongoSink(mongo.mongo_url, mongo_db.name, retry_seconds=30)
        try:
            for offset in range(per_partition):
                tx = UserTransaction(
                    f"p{partition}-{offset}", "u1", "USDT", "deposit", Decimal(1), Decimal(1),
                    Decimal(0), "filled", 1_700_000_000_000_000 + offset,
                )  # fmt: skip
                batch = TxBatch()
                batch.items.append((tx, effects(tx), "t", partition, offset))
                batch.records.append(_Rec(offset))
                sink.write("race", batch, {("t", partition): (None, offset + 1)})
        finally:
            sink.close()

    threads = [threading.Thread(target=write, args=(p,)) for p in range(partitions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "writers did not finish within 120 s"
    total = Decimal(per_partition * partitions)
    assert wallet_balances(mongo_db) == {"u1:USDT": total} == fold_transactions(mongo_db)
