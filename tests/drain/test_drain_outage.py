"""A drain whose PostgreSQL stops mid-batch and comes back ends like a clean run.

Stops a PRIVATE PostgreSQL (own TAPELINE_HOME and port, purged afterwards), never the
session's shared stack.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest

from tasks.core import config
from tasks.drain.migrate import migrate
from tests.drain.support import (
    drain_prices_now,
    pg_schema,
    price_state,
    prices_sink,
    publish,
    quotes,
    trades,
)

PORT = 25433  # test_stack.py's private stack uses 25432


def _stack(env: dict[str, str], *args: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "stack", *args, "--only", "postgres"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def private_pg(settings, postgres):  # the shared one proves the install works
    env = {
        **os.environ,
        "TAPELINE_HOME": str(settings.home / f"test-drain-pg-{uuid.uuid4().hex[:8]}"),
        "TAPELINE_PG_DSN": f"postgresql://tapeline:s3cret@127.0.0.1:{PORT}/tapeline",
    }
    _stack(env, "up")
    try:
        yield env
    finally:
        _stack(env, "down", "--purge")


def _stored(dsn: str) -> int:
    with contextlib.closing(psycopg2.connect(dsn, connect_timeout=2)) as conn, conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(next_offset), 0) FROM kafka_offsets")
        return cur.fetchone()[0]


TRADES = 60_000  # enough that the drain is still at work when PostgreSQL goes down


def test_postgres_stopped_mid_drain_and_restarted_equals_a_clean_run(
    kafka, postgres, private_pg, new_topic, caplog
):
    dsn = config.load(private_pg).pg_dsn
    migrate(dsn)
    t_topic, q_topic = new_topic(3), new_topic(1)
    publish(kafka, t_topic, trades(TRADES))
    publish(kafka, q_topic, quotes(1_000))
    topics, consumer, out = [t_topic, q_topic], f"test-drain-{uuid.uuid4().hex[:8]}", []
    sink = prices_sink(kafka, "public")
    sink.dsn = dsn  # the private instance, on its own port

    def run() -> None:
        from tasks.drain.loop import drain

        out.append(drain(sink, consumer, topics, dlq_source="test", settings=kafka, batch_size=100))

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while _stored(dsn) == 0:  # the first batches are in
        assert time.monotonic() < deadline, "waited 120 s for the drain's first batch"
        time.sleep(0.02)
    _stack(private_pg, "down")
    assert worker.is_alive(), "the drain finished before the outage: make it longer"
    time.sleep(1.5)
    _stack(private_pg, "up")
    worker.join(120)  # liveness: a restart and the sink's backoff on a loaded machine
    assert not worker.is_alive(), "the drain did not finish 120 s after PostgreSQL was back"

    assert len(out) == 1 and out[0].stopped == "caught up"
    retries = [r.message for r in caplog.records if "postgres sink retry" in r.message]
    assert any("connection" in m for m in retries), "the outage should have been retried"
    assert out[0].lag_by_topic() == {t_topic: 0, q_topic: 0}
    with pg_schema(postgres.pg_dsn) as clean:
        single = drain_prices_now(kafka, clean, f"test-drain-{uuid.uuid4().hex[:8]}", topics)
        assert single.written.rows["trades"] == TRADES
        with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trades")
            assert cur.fetchone() == (TRADES,)
        assert price_state(dsn, "public") == price_state(postgres.pg_dsn, clean)
