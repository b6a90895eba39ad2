"""Tapeline on a three-node Kafka cluster loses a node and loses nothing.

Each fault is a SIGKILL of one node (broker and controller in one process): the leader of
the busiest partition of the trades topic during ingestion from the simulator, the same
during a drain, and the active controller of the KRaft quorum. Afterwards every trade id
is stored once without a hole, and the outage shows in what Tapeline measures: acks that
waited for a new leader (ingestion's ``tapeline_event_to_ack_seconds``) and the drain's
longest wait for a stored batch (``DrainResult.longest_wait_s``).

One private cluster for the module (its own ports and TAPELINE_HOME, like
tests/broker.py), killed and purged afterwards; a killed node is started again before the
next test, as an operator would.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError
from kafka.metrics.stats import Total

from simulator.process import ROOT, SimulatorProcess
from stack.services import Kafka, up
from tasks.core import config
from tasks.core.kafka import admin, consumer, producer
from tasks.drain.loop import drain
from tasks.drain.postgres import PostgresSink
from tests.analytics.support import private_schema
from tests.broker import kill, private_broker
from tests.drain.support import publish, trades
from tests.ingest.support import (
    SIM_VENUE,
    assert_contiguous,
    end_offsets,
    first_sent,
    last_json_line,
    scrape,
    trade_ids,
)
from tests.ports import free_port

# Its own three brokers and its own schemas of the stack's PostgreSQL: scripts/test.sh runs
# it beside the tests that use the stack's broker (the second process).
pytestmark = pytest.mark.beside
PORT = 39120  # nodes on 39120/39121, 39122/39123, 39124/39125
SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
SLOW_ACK_S = "2.5"  # a histogram bucket bound: acks slower than this waited for a leader


# A silent broker is fenced, and its partitions get new leaders, after 4 s instead of
# Kafka's 9 s: the same faults, a shorter file (the README's numbers are with 9 s).
FAST_FENCING = {"broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "1000"}


@pytest.fixture(scope="module")
def cluster(settings):
    with private_broker(settings, PORT, FAST_FENCING, TAPELINE_KAFKA_NODES="3") as (
        env, s, broker,
    ):  # fmt: skip
        assert len(s.kafka.bootstrap) == 3 and s.topics.replication == 3
        yield env, s, broker


def _topic(s: config.Settings, prefix: str, replicas: int = 3) -> str:
    """A fresh topic as Tapeline's are made on three nodes: three replicas, two in sync."""
    name = f"test.{prefix}.{uuid.uuid4().hex[:8]}"
    client = admin(s)
    try:
        configs = {"min.insync.replicas": "2"}
        client.create_topics([NewTopic(name, 3, replicas, topic_configs=configs)])
        client.wait_for_topics([name])
    finally:
        client.close()
    return name


def _leaders(s: config.Settings, topic: str) -> dict[int, int]:
    client = admin(s)
    try:
        parts = client.describe_topics([topic])[0]["partitions"]
    finally:
        client.close()
    return {p["partition_index"]: p["leader_id"] for p in parts}


def _busiest(s: config.Settings, topic: str) -> tuple[int, int]:
    """The partition holding most records, and the node leading it."""
    ends = end_offsets(s, topic)
    partition = max(ends, key=ends.get)
    return partition, _leaders(s, topic)[partition]


def _end(s: config.Settings, topic: str, partition: int) -> int | None:
    """The log end of one partition, or None while nobody leads it."""
    c = consumer(None, s, request_timeout_ms=2000)
    try:
        tp = TopicPartition(topic, partition)
        return c.end_offsets([tp])[tp]
    except KafkaError:
        return None
    finally:
        c.close()


def _restart(broker: Kafka) -> None:
    """Start the killed node again (``up`` starts only the nodes not running) and wait
    until all three are registered and unfenced. After the fault is over: a node back
    before the controller fenced it left a producer retrying for over 90 s once."""
    up([broker])


def _slow_acks(metrics: dict[str, float]) -> int:
    """Acks of this ingestion that took longer than ``SLOW_ACK_S``."""
    total = slow = 0.0
    for name, value in metrics.items():
        if name.startswith("tapeline_event_to_ack_seconds_bucket") and 'channel="trades"' in name:
            if 'le="+Inf"' in name:
                total += value
            elif f'le="{SLOW_ACK_S}"' in name:
                slow += value
    return int(total - slow)


def _stored(dsn: str, schema: str, venue: str) -> list[tuple[str, int]]:
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT symbol, trade_id FROM {schema}.trades WHERE venue = %s ORDER BY 1, 2",
            (venue,),
        )
        return cur.fetchall()


def test_busiest_leader_killed_during_ingestion_loses_and_doubles_nothing(
    cluster, postgres, prefect_server
):
    env, s, broker = cluster
    topic = _topic(s, "ingest-kill")
    port = free_port()
    with SimulatorProcess("--symbols", ",".join(SYMBOLS), "--rate", "100") as sim:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "flows.ingest", "--simulator", sim.http_url,
                "--symbols", ",".join(SYMBOLS), "--validate", "off", "--channels", "trades",
                "--trades-topic", topic, "--metrics-port", str(port), "--progress-every", "1",
            ],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120  # liveness: a process start on a busy machine
            while sum(end_offsets(s, topic).values()) < 1000:
                assert proc.poll() is None, "the ingestion ended before publishing"
                assert time.monotonic() < deadline, "waited 120 s for 1000 trades"
                time.sleep(0.3)
            before = scrape(f"http://127.0.0.1:{port}/metrics")
            partition, leader = _busiest(s, topic)
            at_kill = _end(s, topic, partition)
            kill(broker, leader)
            killed_at = time.monotonic()
            while True:  # until the partition takes writes again, under a new leader
                end = _end(s, topic, partition)
                if end is not None and end > at_kill:
                    break
                assert proc.poll() is None, "the ingestion ended when a broker died"
                assert time.monotonic() - killed_at < 60, "no new leader took writes in 60 s"
                time.sleep(0.2)
            resumed_s = time.monotonic() - killed_at
            time.sleep(2)  # and keeps taking them
            after = scrape(f"http://127.0.0.1:{port}/metrics")
            new_leader = _leaders(s, topic)[partition]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        final = sim.report()
    _restart(broker)

    print(f"partition {partition}: leader {leader} killed, writes again after {resumed_s:.1f} s"
          f" under {new_leader}; acks slower than {SLOW_ACK_S} s: {_slow_acks(after)}")  # fmt: skip
    assert new_leader != leader
    # the outage shows (a fresh cluster on a loaded machine may be slow once before it)
    assert _slow_acks(after) > _slow_acks(before), (_slow_acks(before), _slow_acks(after))
    report = last_json_line(err.split("stopped: ", 1)[1].splitlines()[0])
    assert report["failed"] == 0 and report["unresolved_at_exit"] == 0, report
    assert report["sent"] == report["acked"]
    got = trade_ids(s, topic)
    with private_schema(s.pg_dsn) as schema:
        res = drain(PostgresSink(s.pg_dsn, schema), f"test-cluster-{uuid.uuid4().hex[:6]}",
                    [topic], dlq_source="test", settings=s, max_seconds=60)  # fmt: skip
        rows = _stored(s.pg_dsn, schema, SIM_VENUE)
    assert res.stopped == "caught up", res
    for symbol in SYMBOLS:
        stored = [i for sym, i in rows if sym == symbol]
        assert_contiguous(stored, symbol)  # each once, no hole
        assert stored == sorted(set(got[symbol]))  # what the topic holds, once
        assert stored[0] == first_sent(final, symbol)
    assert len(rows) == report["acked"]


def test_active_controller_killed_while_producing_loses_and_doubles_nothing(cluster):
    _, s, broker = cluster
    topic = _topic(s, "controller-kill")
    controller = broker.active_controller()
    p = producer(s)
    retries = p._metrics.metric_name("record-retry-total", "producer-metrics")
    p._sender._sensors.retry_sensor.add(retries, Total())  # kafka-python keeps only a rate
    sent: list = []
    waited: list[float] = []  # send to ack, per record
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set():
            future = p.send(topic, key=SYMBOLS[i % 3].encode(), value=str(i).encode())
            t0 = time.monotonic()
            future.add_callback(lambda _, t0=t0: waited.append(time.monotonic() - t0))
            sent.append(future)
            i += 1
            time.sleep(0.002)

    sender = threading.Thread(target=send)
    sender.start()
    led = set(_leaders(s, topic).values())
    try:
        time.sleep(2)
        kill(broker, controller)
        killed_at = time.monotonic()
        new = None
        while new in (None, controller):
            with contextlib.suppress(KafkaError):
                new = broker.active_controller()
            assert time.monotonic() - killed_at < 60, "no new active controller in 60 s"
            time.sleep(0.2)
        elected_s = time.monotonic() - killed_at
        # A controller's work, with two nodes left: a topic created after the election.
        # kafka-python sends it to the metadata's "controller", a random broker in KRaft,
        # the dead one until it is fenced (connection refused): try again until it works.
        while True:
            try:
                _topic(s, "after-election", replicas=2)
                break
            except KafkaError:
                assert time.monotonic() - killed_at < 60, "no topic could be created in 60 s"
                time.sleep(0.5)
        created_s = time.monotonic() - killed_at
        time.sleep(2)
    finally:
        stop.set()
        sender.join(30)
    try:
        p.flush(timeout=90)
        offsets = [f.get(timeout=1) for f in sent]  # every record acknowledged
        retried = int(p._metrics.metrics[retries].value())
    finally:
        p.close(timeout=5)
    _restart(broker)

    print(f"controller {controller} killed: node {new} active after {elected_s:.1f} s;"
          f" topic created after {created_s:.1f} s; {len(sent)} records, {retried} retried,"
          f" longest ack {max(waited):.1f} s")  # fmt: skip
    assert len({(m.partition, m.offset) for m in offsets}) == len(sent)
    if controller in led:  # it led a partition too: those records waited for a new leader
        assert max(waited) > float(SLOW_ACK_S)
    c = consumer(None, s, consumer_timeout_ms=5000)
    try:
        tps = [TopicPartition(topic, i) for i in range(3)]
        c.assign(tps)
        c.seek_to_beginning()
        values = [r.value for r in c]
    finally:
        c.close()
    assert sorted(values, key=int) == [str(i).encode() for i in range(len(sent))]


def test_busiest_leader_killed_during_a_drain_stores_each_trade_once(cluster, postgres):
    _, s, broker = cluster
    topic = _topic(s, "drain-kill")
    items = trades(30_000, venue="cluster")
    publish(s, topic, items)
    partition, leader = _busiest(s, topic)
    out: list = []
    with private_schema(s.pg_dsn) as schema:

        def run() -> None:
            sink, name = PostgresSink(s.pg_dsn, schema), f"test-cluster-{uuid.uuid4().hex[:6]}"
            kw = {"dlq_source": "test", "settings": s, "batch_size": 500, "max_seconds": 90}
            out.append(drain(sink, name, [topic], **kw))

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 60
        while not _stored(s.pg_dsn, schema, "cluster"):  # the first batches are in
            assert time.monotonic() < deadline, "waited 60 s for the drain's first batch"
            time.sleep(0.02)
        assert worker.is_alive(), "the drain finished before the kill: give it more"
        kill(broker, leader)
        worker.join(120)
        rows = _stored(s.pg_dsn, schema, "cluster")

    assert len(out) == 1, "the drain did not end"
    res = out[0]
    print(f"partition {partition}: leader {leader} killed mid-drain; drain {res.seconds:.1f} s,"
          f" longest wait for a batch {res.longest_wait_s:.1f} s")  # fmt: skip
    assert res.stopped == "caught up" and res.lag_by_topic() == {topic: 0}, res
    assert rows == sorted((t.symbol, t.trade_id) for t in items)  # each once, none missing
    assert res.longest_wait_s > 2  # the outage shows: the partition waited for a leader
