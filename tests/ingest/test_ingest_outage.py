"""Kafka down for 20 s mid-stream: ingestion blocks at its in-flight bound instead of
buffering, keeps no more memory than that, and after the broker is back every trade id
is in the topic once and in order.

Uses a private Kafka on other ports in its own TAPELINE_HOME (as tests/test_stack.py
does), so stopping it disturbs nobody; it is killed and purged afterwards.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from kafka.admin import NewTopic

from simulator.process import ROOT, SimulatorProcess
from stack.services import up
from tasks.core import config
from tasks.core.kafka import admin
from tasks.core.topics import ensure_topics
from tests.broker import kill, private_broker
from tests.ingest.support import (
    SIM_VENUE,
    assert_contiguous,
    end_offsets,
    first_sent,
    last_json_line,
    scrape,
    trade_ids,
)

KAFKA_PORT = 29192
SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
MAX_IN_FLIGHT = 1000
OUTAGE_S = 20
# A trades topic of its own: the feed's lease (venue + trades topic) is then this test's
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port = _free_port()
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
            _, err = proc.communicate(timeout=40)
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
