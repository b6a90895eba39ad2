"""The exporter's probes against the real local stack: Kafka lag, PostgreSQL freshness,
failed and crashed runs from the Prefect API, and how the gauges follow them."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY

from tasks.core.kafka import admin, consumer, producer
from tasks.core.pg import connect
from tasks.telemetry import exporter
from tasks.telemetry.prefect_api import PrefectApi
from tests.analytics.support import private_schema
from tests.ports import free_port


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_lag_is_log_end_minus_committed_per_partition(kafka, new_topic) -> None:
    topic = new_topic(partitions=2)
    p = producer(kafka, linger_ms=0)
    for i in range(10):
        p.send(topic, value=b"x", partition=i % 2)  # 5 records per partition
    p.flush(10)
    p.close()
    group = f"tapeline.test-{uuid.uuid4().hex[:8]}"
    c = consumer(group, kafka)
    c.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1),
              TopicPartition(topic, 1): OffsetAndMetadata(5, "", -1)})  # fmt: skip
    c.close()
    client = admin(kafka)
    try:
        lag = exporter.consumer_lag(client, group)
        assert lag == {(group, topic, "0"): 3, (group, topic, "1"): 0}
        # Only the watched prefix: a group outside it is not reported.
        assert exporter.consumer_lag(client, f"{group}-other") == {}
    finally:
        client.delete_groups([group])
        client.close()


@pytest.fixture
def trades_schema(pg_conn):
    """A private schema with a ``trades`` table, first on the search path."""
    schema = f"test_{uuid.uuid4().hex[:8]}"
    pg_conn.autocommit = True
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"SET search_path = {schema}")
        cur.execute(
            "CREATE TABLE trades (venue text, symbol text, trade_id bigint, event_us bigint,"
            " PRIMARY KEY (venue, symbol, trade_id))"
        )
    yield pg_conn
    with pg_conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {schema} CASCADE")


def test_freshness_is_age_of_newest_trade_per_pair(trades_schema) -> None:
    now = time.time()
    us = int(now * 1_000_000)
    rows = [
        ("binance", "BTC-USDT", 1, us - 9_000_000),
        ("binance", "BTC-USDT", 2, us - 4_000_000),  # newest of the pair: 4 s old
        ("binance", "ETH-USDT", 7, us - 60_000_000),
        ("kraken", "BTC-USD", 3, us - 500_000),
        ("coinbase", "SOL-USD", 1, us - 7_200_000_000),  # 2 h old: outside a 1 h window
    ]
    with trades_schema.cursor() as cur:
        cur.executemany("INSERT INTO trades VALUES (%s, %s, %s, %s)", rows)
    ages = exporter.freshness(trades_schema, now, window_s=3600)
    assert set(ages) == {("binance", "BTC-USDT"), ("binance", "ETH-USDT"), ("kraken", "BTC-USD")}
    assert ages[("binance", "BTC-USDT")] == pytest.approx(4.0, abs=1e-3)
    assert ages[("binance", "ETH-USDT")] == pytest.approx(60.0, abs=1e-3)
    assert ages[("kraken", "BTC-USD")] == pytest.approx(0.5, abs=1e-3)
    assert exporter.freshness(trades_schema, now, window_s=86_400)[
        ("coinbase", "SOL-USD")
    ] == pytest.approx(7200.0, abs=1e-3)


def test_reconcile_shows_the_newest_checked_day_per_venue(postgres) -> None:
    """Completeness, missing and extra of each venue's newest day, over the hours checked
    in it; an older day and another day's hours do not count."""
    day, hour = exporter.DAY_US, 3_600_000_000
    d1 = 20_000 * day
    rows = [  # venue, symbol, hour, venue trades, stored, missing, extra
        ("binance", "BTC-USDT", d1 - hour, 500, 400, 100, 0),  # the day before: not shown
        ("binance", "BTC-USDT", d1, 10_000, 9_999, 1, 0),
        ("binance", "ETH-USDT", d1 + 5 * hour, 10_000, 9_998, 2, 3),
        ("kraken", "BTC-USD", d1 - hour, 0, 0, 0, 0),  # a day the venue listed no trade
    ]
    with private_schema(postgres.pg_dsn) as schema:
        conn = connect(postgres.pg_dsn, schema)
        try:
            with conn, conn.cursor() as cur:
                for r in rows:
                    cur.execute(
                        """INSERT INTO reconcile_hours (venue, symbol, hour_us, venue_trades,
                               stored_trades, missing, extra, venue_volume, stored_volume)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, 0, 0)""",
                        r,
                    )
            days = {d.venue: d for d in exporter.newest_days(conn)}
        finally:
            conn.close()
    assert set(days) == {"binance", "kraken"}
    b = days["binance"]
    assert (b.day_us, b.venue_trades, b.missing, b.extra) == (d1, 20_000, 3, 3)
    assert b.ratio == pytest.approx(0.99985)
    assert (days["kraken"].day_us, days["kraken"].ratio) == (d1 - day, 1.0)


def test_failed_and_crashed_runs_are_counted_per_flow(prefect_server: str, settings) -> None:
    api = PrefectApi(prefect_server, settings.prefect_auth)  # the exporter's own client
    name = f"test-exporter-{uuid.uuid4().hex[:8]}"
    flow = api.post("/flows/", {"name": name})
    try:
        for final in ("FAILED", "FAILED", "CRASHED", "COMPLETED"):
            run = api.post("/flow_runs/", {"flow_id": flow["id"]})
            for state in ("RUNNING", final):
                path = f"/flow_runs/{run['id']}/set_state"
                answer = api.post(path, {"state": {"type": state}, "force": True})
                assert answer["status"] == "ACCEPT"
        now = datetime.now(UTC)
        counts = exporter.failed_flow_runs(api, now, timedelta(hours=1))
        assert counts[(name, "failed")] == 2
        assert counts[(name, "crashed")] == 1
        assert not any(flow_name == name and s == "completed" for flow_name, s in counts)
        # Runs that ended before the window are not counted.
        later = now + timedelta(hours=2)
        assert (name, "failed") not in exporter.failed_flow_runs(api, later, timedelta(hours=1))
    finally:
        api.delete(f"/flows/{flow['id']}")


def test_publish_sets_new_series_and_removes_vanished_ones() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    gauge = Gauge("lag_probe", "test", ("group",), registry=registry)
    shown: set = set()
    exporter.publish(gauge, {("a",): 3, ("b",): 4}, shown)
    exporter.publish(gauge, {("b",): 5}, shown)
    assert registry.get_sample_value("lag_probe", {"group": "a"}) is None
    assert registry.get_sample_value("lag_probe", {"group": "b"}) == 5


def test_an_unreachable_source_is_counted_and_the_others_still_run(kafka, new_topic) -> None:
    topic = new_topic(partitions=1)
    group = f"tapeline.test-{uuid.uuid4().hex[:8]}"
    p = producer(kafka, linger_ms=0)
    for _ in range(4):
        p.send(topic, value=b"x", partition=0)
    p.flush(10)
    p.close()
    c = consumer(group, kafka)
    c.commit({TopicPartition(topic, 0): OffsetAndMetadata(1, "", -1)})
    c.close()
    port = free_port()
    nowhere = f"postgresql://u:p@127.0.0.1:{port}/x"
    broken = kafka.with_overrides(
        pg_dsn=nowhere,
        pg_reader_dsn=nowhere,
        prefect_api_url=f"http://127.0.0.1:{port}/api",
    )
    before = {
        p: sample("tapeline_exporter_errors_total", probe=p) or 0 for p in ("postgres", "prefect")
    }
    probe = exporter.Exporter(broken, group_prefix=group)
    try:
        assert probe.collect() == {
            "kafka": True, "postgres": False, "reconcile": False, "prefect": False,
        }  # fmt: skip
        assert sample("tapeline_consumer_lag", group=group, topic=topic, partition="0") == 3
        for name in ("postgres", "prefect"):
            assert sample("tapeline_exporter_errors_total", probe=name) == before[name] + 1
    finally:
        probe.close()
        client = admin(kafka)
        client.delete_groups([group])
        client.close()
