"""First contact with each real service of the local stack."""

from __future__ import annotations

import uuid
from collections import defaultdict
from decimal import Decimal

from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from tasks.core.kafka import admin, consumer, producer
from tasks.core.topics import TOPICS, ensure_topics


def test_kafka_keys_keep_their_partition_and_order(kafka, new_topic):
    topic = new_topic(partitions=6)
    symbols = [f"SYM{i}-USDT" for i in range(24)]
    p = producer(kafka)
    futures = [
        p.send(topic, key=s.encode(), value=f"{s}:{n}".encode()) for n in range(50) for s in symbols
    ]
    p.flush()
    acked = [f.get(timeout=10) for f in futures]
    p.close()
    assert len(acked) == 50 * len(symbols)

    c = consumer(None, kafka, consumer_timeout_ms=3000)
    c.assign([TopicPartition(topic, i) for i in range(6)])
    c.seek_to_beginning()
    partitions_of: dict[str, set[int]] = defaultdict(set)
    seen: dict[str, list[int]] = defaultdict(list)
    for rec in c:
        sym, n = rec.value.decode().split(":")
        assert rec.key.decode() == sym
        partitions_of[sym].add(rec.partition)
        seen[sym].append(int(n))
    c.close()
    assert all(len(ps) == 1 for ps in partitions_of.values()), "a key moved partitions"
    assert len({next(iter(ps)) for ps in partitions_of.values()}) > 1, "keys did not spread"
    assert all(seen[s] == list(range(50)) for s in symbols), "per-key order broken"


def test_topic_provisioning_is_idempotent(kafka):
    first = ensure_topics(kafka)
    assert set(first) == {t.name for t in TOPICS}
    again = ensure_topics(kafka)
    assert set(again.values()) == {"exists"}
    names = [t.name for t in TOPICS]
    client = admin(kafka)
    try:
        described = {t["name"]: t for t in client.describe_topics(names)}
        resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        configs = client.describe_configs(resources)["topic"]
    finally:
        client.close()
    for spec in TOPICS:
        assert len(described[spec.name]["partitions"]) == kafka.topics.partitions
        hours = spec.retention_hours or kafka.topics.retention_hours
        assert configs[spec.name]["retention.ms"]["value"] == str(hours * 3_600_000)


def test_postgres_round_trip_keeps_exact_decimals(pg_conn):
    price = Decimal("64123.123456789012345678")
    with pg_conn, pg_conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (price NUMERIC NOT NULL)")
        cur.execute("INSERT INTO t VALUES (%s)", (price,))
        cur.execute("SELECT price, 1 FROM t")
        assert cur.fetchone() == (price, 1)


def test_mongo_round_trip(mongo_db):
    doc = {"_id": uuid.uuid4().hex, "user_id": "u1", "qty": "0.00012345"}
    mongo_db.things.insert_one(doc)
    assert mongo_db.things.find_one({"_id": doc["_id"]}) == doc
    assert mongo_db.client.admin.command("ping")["ok"] == 1.0


def test_prefect_server_records_a_flow_run(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="tapeline-smoke")
    def smoke(x: int) -> int:
        return x * 2

    state = smoke(21, return_state=True)
    assert state.is_completed() and state.result() == 42
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state is not None and run.state.is_completed()
    assert client.api_url.host == "127.0.0.1"
