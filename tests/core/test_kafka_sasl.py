"""The local stack's Kafka with SASL/SCRAM: clients with the password work end to end
(produce, consume, a drain into PostgreSQL), clients without it are refused, and the
password is in no log of the broker.

Uses a private broker on other ports in its own TAPELINE_HOME (as tests/test_stack.py
does); it is killed and purged afterwards.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from tasks.core import config
from tasks.core.kafka import admin, producer
from tests.broker import private_broker
from tests.drain.support import drain_prices_now, pg_schema, publish, trades

# Its own broker, topic and schema: scripts/test.sh runs it in the second process.
pytestmark = pytest.mark.beside

KAFKA_PORT = 29292
# Reserved characters of URLs, properties files and JAAS; SCRAM's own (, ] ") are refused.
PASSWORD = f"s@sl:pa/ss%{uuid.uuid4().hex[:6]}#?\\end"


@pytest.fixture
def scram_kafka(settings, kafka):  # the shared Kafka proves the jars are installed
    scram = {
        "TAPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "TAPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "TAPELINE_KAFKA_USERNAME": "tapeline",
        "TAPELINE_KAFKA_PASSWORD": PASSWORD,
    }
    with private_broker(settings, KAFKA_PORT, **scram) as (_, s, broker):
        yield s, broker


def _refused(s: config.Settings) -> str:
    """What a client with these settings gets: the error it raised (it must raise)."""
    try:
        # refused at once; 8 s of retrying is plenty to see it (the default is 30)
        client = admin(s, request_timeout_ms=8_000, bootstrap_timeout_ms=8_000)
        try:
            client.list_topics()
        finally:
            client.close()
    except KafkaError as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"a client with {s.kafka!r} was let in")


def _broker_log(broker) -> str:
    return "\n".join(
        f.read_text(errors="replace")
        for f in broker.dir.parent.rglob("*")
        if f.is_file() and f.suffix in (".log", ".out")
    )


def test_scram_clients_work_and_others_are_refused(scram_kafka, postgres, caplog):
    s, broker = scram_kafka
    props = (broker.dir / "server.properties").read_text()
    assert "listeners=SASL_PLAINTEXT://127.0.0.1" in props
    assert "PLAINTEXT://127.0.0.1:29292" not in props.replace("SASL_PLAINTEXT", "")
    assert oct((broker.dir / "server.properties").stat().st_mode & 0o777) == "0o600"

    topic = f"test.sasl.{uuid.uuid4().hex[:8]}"
    client = admin(s)
    client.create_topics([NewTopic(topic, 2, 1)])
    client.close()
    items = trades(300)
    publish(s, topic, items)
    with pg_schema(postgres.pg_dsn) as schema:
        res = drain_prices_now(s, schema, f"test-sasl-{uuid.uuid4().hex[:6]}", [topic])
    assert res.stopped == "caught up" and res.written.rows["trades"] == len(items), res

    # Refused by the broker for its credentials: the broker says so in its log. (The
    # client gives up bootstrapping with a timeout; it logs the broker's answer, or, when
    # the broker closed the socket before the answer was read, a dropped connection.)
    wrong = replace(s, kafka=replace(s.kafka, password=PASSWORD + "x"))
    caplog.clear()
    _refused(wrong)
    deadline = time.monotonic() + 30  # liveness: the broker's log line reaching its file
    while "Failed authentication" not in _broker_log(broker):
        assert time.monotonic() < deadline, "the broker logged no failed authentication"
        time.sleep(0.5)
    assert "invalid credentials" in _broker_log(broker)
    assert PASSWORD not in caplog.text
    plain = replace(s, kafka=replace(s.kafka, security_protocol="PLAINTEXT", sasl_mechanism=""))
    _refused(plain)
    with pytest.raises(KafkaError):  # the producer cannot even bootstrap
        sender = producer(wrong, max_block_ms=5000, bootstrap_timeout_ms=8000)
        sender.send(topic, b"x").get(timeout=30)

    logs = [f for f in broker.dir.parent.rglob("*") if f.is_file() and f.suffix in (".log", ".out")]
    assert logs, "the broker wrote no log"
    for f in logs:
        assert PASSWORD not in f.read_text(errors="replace"), f"the password is in {f}"
