"""The local stack keeps data across a restart and leaves nothing behind on teardown.

Runs a second, private stack (Kafka, PostgreSQL, MongoDB protocol) on other ports in a
temporary TAPELINE_HOME, so the session's shared stack is not disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg2
import pymongo
import pytest

from stack.process import port_open
from tasks.core import config

PORTS = {"kafka": 29092, "postgres": 25432, "mongo": 27217}


@pytest.fixture
def private_env(settings, kafka, postgres, mongo):  # the shared ones prove installs work
    home = settings.home / f"test-stack-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "TAPELINE_HOME": str(home),
        "TAPELINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{PORTS['kafka']}",
        "TAPELINE_PG_DSN": f"postgresql://tapeline:s3cret@127.0.0.1:{PORTS['postgres']}/tapeline",
        "TAPELINE_MONGO_URL": f"mongodb://127.0.0.1:{PORTS['mongo']}/",
    }
    yield env
    _stack(env, "down", "--purge")


def _stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stack", *args, "--only", "kafka,postgres,mongo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_restart_keeps_data_and_teardown_leaves_no_listener(private_env):
    s = config.load(private_env)
    up = _stack(private_env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Apache Kafka 4.3" in up.stdout

    token = uuid.uuid4().hex
    with psycopg2.connect(s.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS keep (token TEXT)")
        cur.execute("INSERT INTO keep VALUES (%s)", (token,))
    with pymongo.MongoClient(s.mongo_url) as client:
        client.keep.things.insert_one({"_id": token})
    from kafka import TopicPartition

    from tasks.core.kafka import consumer, producer

    p = producer(s)
    meta = p.send("market.alerts", key=b"k", value=token.encode()).get(timeout=10)
    p.close()

    down = _stack(private_env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for port in PORTS.values():
        assert not port_open("127.0.0.1", port), f"port {port} still listening after down"

    again = _stack(private_env, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exists   market.alerts" in again.stdout
    with psycopg2.connect(s.pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM keep WHERE token = %s", (token,))
        assert cur.fetchone() == (1,)
    with pymongo.MongoClient(s.mongo_url) as client:
        assert client.keep.things.find_one({"_id": token}) == {"_id": token}
    c = consumer(None, s, consumer_timeout_ms=5000)
    tp = TopicPartition("market.alerts", meta.partition)
    c.assign([tp])
    c.seek(tp, meta.offset)
    assert next(iter(c)).value == token.encode()
    c.close()

    assert _stack(private_env, "down").returncode == 0
    for port in PORTS.values():
        assert not port_open("127.0.0.1", port)


def test_documents_are_found_by_id_through_the_index(mongo):
    """Every find, update and delete by ``_id`` of the wallet sink is a key lookup. Stock
    FerretDB 1.24 on SQLite reads the whole table for each (its lookup expression does not
    match its own index); the stack builds it patched, and this asks SQLite's planner."""
    with pymongo.MongoClient(mongo.mongo_url) as client:
        db = client[f"plan_{uuid.uuid4().hex[:8]}"]
        try:
            db.things.insert_many([{"_id": f"thing#{i}", "n": i} for i in range(50)])
            plan = db.command("explain", {"find": "things", "filter": {"_id": "thing#7"}})
            if "ferretdbVersion" not in client.server_info():
                assert plan["queryPlanner"]["winningPlan"]["stage"] in {"IDHACK", "EXPRESS_IXSCAN"}
                return
            steps = plan["queryPlanner"]["Plan"]
            assert any("USING INDEX" in step for step in steps), steps
            assert db.things.find_one({"_id": "thing#7"})["n"] == 7
            assert db.things.find_one({"_id": "thing#50"}) is None
        finally:
            client.drop_database(db.name)
