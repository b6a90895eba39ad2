"""Kafka down for 20 s mid-stream: ingestion blocks at its in-flight bound instead of
buffering, keeps no more memory than that, and after the broker is back every trade id
is in the topic once and in order. Coinbase ingestion through a broker frozen for longer
than the publish timeout: the expired trades come back, and each is stored once.

Uses a private Kafka on other ports in its own TAPELINE_HOME (as tests/test_stack.py
does), so stopping it disturbs nobody; it is killed and purged afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from simulator.process import ROOT, SimulatorProcess
from stack.process import read_pid
from stack.services import up
from tasks.core import config
from tasks.core.kafka import admin
from tasks.core.pg import connect
from tasks.core.topics import ensure_topics
from tasks.drain.loop import drain
from tasks.drain.postgres import PostgresSink
from tests.analytics.support import private_schema
from tests.broker import kill, private_broker
from tests.ingest.support import (
    SIM_VENUE,
    assert_contiguous,
    end_offsets,
    first_sent,
    last_json_line,
    last_sent,
    scrape,
    trade_ids,
)
from tests.ports import free_port

# Its own brokers, topics and schemas: scripts/test.sh runs it in the second process.
pytestmark = pytest.mark.beside

KAFKA_PORT = 29192
SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
MAX_IN_FLIGHT = 1000
OUTAGE_S = 20
# A trades topic of its own: the lease (venue + trades topic + symbol) is then this test's
# alone, whatever ingestion of the default topic runs on this machine meanwhile.
TRADES = f"test.outage.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def private_kafka(settings, kafka):  # the shared Kafka proves the jars are installed
    with private_broker(settings, KAFKA_PORT, TAPELINE_TOPIC_PARTITIONS="3") as (env, s, broker):
        ensure_topics(s)
        client = admin(s)
        client.create_topics([NewTopic(TRADES, 3, 1)])
        client.wait_for_topics([TRADES])
        client.close()
        yield env, s, broker


def _behind(sim: SimulatorProcess, s: config.Settings) -> int:
    """Trades the simulator has made since ingestion began that are not in the topic."""
    report = sim.report()
    made = sum(report["markets"][sym]["last_id"] - first_sent(report, sym) + 1 for sym in SYMBOLS)
    return made - sum(end_offsets(s, TRADES).values())


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_kafka_down_20s_blocks_at_the_bound_then_resumes_exactly_once(
    private_kafka, prefect_server
):
    env, s, broker = private_kafka
    port = free_port()
    gauge = f'tapeline_inflight_messages{{venue="{SIM_VENUE}"}}'
    with SimulatorProcess("--symbols", ",".join(SYMBOLS), "--rate", "1000") as sim:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.ingest",
                "--simulator",
                sim.http_url,
                "--symbols",
                ",".join(SYMBOLS),
                "--validate",
                "off",
                "--channels",
                "trades",
                "--trades-topic",
                TRADES,
                "--metrics-port",
                str(port),
                "--progress-every",
                "0.5",
                "--max-in-flight",
                str(MAX_IN_FLIGHT),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 180  # liveness: a process start on a busy machine
            while sum(end_offsets(s, TRADES).values()) < 1500:
                assert proc.poll() is None, "the ingestion ended before publishing"
                assert time.monotonic() < deadline, "waited 180 s for 1500 trades to be published"
                time.sleep(0.3)
            rss_before = _rss_kb(proc.pid)

            kill(broker)
            down_at = time.monotonic()
            inflight, rss = [], []
            while time.monotonic() - down_at < OUTAGE_S:
                time.sleep(0.5)
                inflight.append(scrape(f"http://127.0.0.1:{port}/metrics")[gauge])
                rss.append(_rss_kb(proc.pid))
            up([broker])  # a restart after SIGKILL takes ~15 s more (the old session expires)
            back_at = time.monotonic()
            while _behind(sim, s) > 1000:  # about a second of trades
                assert time.monotonic() - back_at < 120, "did not catch up after Kafka came back"
                time.sleep(0.5)
            exported = scrape(f"http://127.0.0.1:{port}/metrics")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=90)  # a flush of up to 30 s, then Prefect's exit
        final = sim.report()

    assert max(inflight) == MAX_IN_FLIGHT, inflight  # the bound was reached and held
    shard = f'{{shard="0",venue="{SIM_VENUE}"}}'
    for name in ("vendor_fetch_success_total", "kafka_publish_success_total"):
        assert exported[name + shard] > 10_000, name
    assert exported.get("kafka_publish_failure_total" + shard, 0) == 0
    acks = f'tapeline_event_to_ack_seconds_count{{channel="trades",venue="{SIM_VENUE}"}}'
    assert exported[acks] > 0
    assert (max(rss) - rss_before) / 1024 < 40, (rss_before, rss)
    assert "stopped: " in err, err[-3000:]
    report = last_json_line(err.split("stopped: ", 1)[1].splitlines()[0])
    assert report["peak_in_flight"] == MAX_IN_FLIGHT
    assert report["unresolved_at_exit"] == 0
    assert report["sent"] == report["acked"] + report["failed"]
    ids = trade_ids(s, TRADES)
    assert sum(map(len, ids.values())) == report["acked"]
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)
        assert ids[symbol][0] == first_sent(final, symbol)
        assert ids[symbol][-1] - ids[symbol][0] > OUTAGE_S * 300  # spans the outage (~330/s each)


COINBASE_SYMBOLS = ["BTC-USD", "ETH-USD"]
FROZEN_S = 12  # four times the delivery timeout below


def _ended(when: str, proc: subprocess.Popen) -> str:
    """The failure text for an ingestion process that exited early: its log's tail."""
    err = proc.stderr.read() if proc.stderr else ""
    return f"the ingestion ended {when} (rc {proc.returncode}):\n{err[-4000:]}"


def test_coinbase_through_a_kafka_freeze_longer_than_the_publish_timeout_stores_each_trade_once(
    settings, kafka, postgres, prefect_server
):
    """Coinbase ingestion with a 3 s delivery timeout while the broker is frozen for 12 s:
    the trades whose publish expired are repaired or sent again, not dropped, and the
    drain stores every trade id of the run once, without a hole."""
    topic = f"test.freeze.{uuid.uuid4().hex[:10]}"
    venue = "coinbase-sim"
    with private_broker(settings, 29292, TAPELINE_KAFKA_DELIVERY_TIMEOUT_MS="3000") as (
        env, s, broker,
    ):  # fmt: skip
        ensure_topics(s)
        client = admin(s)
        client.create_topics([NewTopic(topic, 3, 1)])
        client.wait_for_topics([topic])
        client.close()
        with SimulatorProcess("--symbols", ",".join(COINBASE_SYMBOLS), "--rate", "200") as sim:
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "flows.ingest", "--venue", "coinbase",
                    "--simulator", sim.http_url, "--symbols", ",".join(COINBASE_SYMBOLS),
                    "--validate", "off", "--channels", "trades", "--trades-topic", topic,
                    "--metrics-port", "0", "--progress-every", "1",
                ],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 180  # liveness: a process start on a busy machine
                while sum(end_offsets(s, topic).values()) < 500:
                    assert proc.poll() is None, _ended("before publishing", proc)
                    assert time.monotonic() < deadline, "waited 180 s for 500 trades"
                    time.sleep(0.3)
                pid = read_pid(broker.pidfile)
                os.killpg(pid, signal.SIGSTOP)
                try:
                    time.sleep(FROZEN_S)
                finally:
                    os.killpg(pid, signal.SIGCONT)
                report = sim.report()
                made = {
                    sym: range(
                        first_sent(report, sym, "coinbase"), last_sent(report, sym, "coinbase") + 1
                    )
                    for sym in COINBASE_SYMBOLS
                }
                deadline = time.monotonic() + 120
                while True:  # every trade made before the thaw reaches the topic
                    try:
                        got = trade_ids(s, topic, venue=venue)
                    except KafkaError:  # frozen past its session, the broker re-registers
                        got = {}
                    if got and all(set(made[sym]) <= set(got[sym]) for sym in COINBASE_SYMBOLS):
                        break
                    assert proc.poll() is None, _ended("during the freeze", proc)
                    assert time.monotonic() < deadline, "trades of the freeze missing after 120 s"
                    time.sleep(1)
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=60)
        stop = last_json_line(err.split("stopped: ", 1)[1].splitlines()[0])
        assert stop["failed"] > 0, "no publish expired: the freeze did not outlast the timeout"
        assert stop["unresolved_at_exit"] == 0
        got = trade_ids(s, topic, venue=venue)
        with private_schema(s.pg_dsn) as schema:
            drain(PostgresSink(s.pg_dsn, schema), f"test-freeze-{uuid.uuid4().hex[:6]}",
                  [topic], dlq_source="test", settings=s, max_seconds=60)  # fmt: skip
            conn = connect(s.pg_dsn, schema)
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(
                        "SELECT symbol, trade_id FROM trades WHERE venue = %s ORDER BY 1, 2",
                        (venue,),
                    )
                    rows = cur.fetchall()
            finally:
                conn.close()
    for sym in COINBASE_SYMBOLS:
        stored = [i for symbol, i in rows if symbol == sym]
        assert stored == sorted(set(got[sym])), sym  # everything in Kafka, once
        assert_contiguous(stored, sym)
        # from the subscribe snapshot (Coinbase sends the last 50 trades) past the thaw
        assert stored[0] <= made[sym][0] and stored[-1] >= made[sym][-1]
