"""Drain metrics through a real Pushgateway (Debian's ``prometheus-pushgateway``).

Each drain run is its own process in production, so the runs here are real child
processes too: what must hold is that counters keep adding up across runs, a failed run
keeps the last success time, and nothing is counted twice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks.core import config
from tasks.telemetry import observe
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        msg = "prometheus-pushgateway not installed (Debian package prometheus-pushgateway)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    port = free_port()
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # liveness: start-up on a loaded machine
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "pushgateway did not become ready"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def group(url: str, flow: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What the gateway serves for one drain flow's group, labels sorted."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("flow") == flow and s.labels.get("job") == observe.JOB:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(url: str, flow: str, name: str, **labels: str) -> float | None:
    want = {"job": observe.JOB, "flow": flow, "instance": "", **labels}
    return group(url, flow).get((name, tuple(sorted(want.items()))))


def run_drain(url: str, flow: str, body: str) -> None:
    """One drain 'run': a fresh process that records metrics and pushes them."""
    code = textwrap.dedent(
        f"""
        from tasks.core.metrics import *
        from tasks.telemetry.observe import push_drain_metrics
        {textwrap.indent(textwrap.dedent(body), " " * 8).strip()}
        assert push_drain_metrics({flow!r}, url={url!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def test_counters_add_up_across_runs_and_failed_runs_keep_last_success(gateway: str) -> None:
    flow = f"drain-{uuid.uuid4().hex[:8]}"
    rows = {"sink": "postgres", "table": "trades"}
    run_drain(
        gateway,
        flow,
        f"""
        DRAIN_ROWS.labels(sink="postgres", table="trades").inc(100)
        DRAIN_BATCH_SECONDS.labels(sink="postgres").observe(0.02)
        DRAIN_LAST_SUCCESS.labels(flow={flow!r}).set(1000)
        """,
    )
    assert value(gateway, flow, "tapeline_drain_rows_total", **rows) == 100
    # The same count again must still add: a replaced 100 would hide this run.
    run_drain(
        gateway,
        flow,
        f"""
        DRAIN_ROWS.labels(sink="postgres", table="trades").inc(100)
        DRAIN_DUPLICATES.labels(sink="postgres", table="trades").inc(7)
        DRAIN_BATCH_SECONDS.labels(sink="postgres").observe(0.02)
        DRAIN_LAST_SUCCESS.labels(flow={flow!r}).set(2000)
        """,
    )
    assert value(gateway, flow, "tapeline_drain_rows_total", **rows) == 200
    assert value(gateway, flow, "tapeline_drain_duplicates_total", **rows) == 7
    batch = {"sink": "postgres"}
    assert value(gateway, flow, "tapeline_drain_batch_seconds_count", **batch) == 2
    assert value(gateway, flow, "tapeline_drain_batch_seconds_bucket", le="0.01", **batch) == 0
    assert value(gateway, flow, "tapeline_drain_batch_seconds_bucket", le="0.025", **batch) == 2
    assert value(gateway, flow, "tapeline_drain_batch_seconds_bucket", le="+Inf", **batch) == 2
    assert value(gateway, flow, "tapeline_drain_batch_seconds_sum", **batch) == pytest.approx(0.04)
    # A failed run: rejects counted, no success time set. The last success stays.
    run_drain(
        gateway,
        flow,
        """
        DRAIN_REJECTS.labels(sink="postgres", topic="market.trades.raw").inc(3)
        """,
    )
    assert value(gateway, flow, "tapeline_drain_last_success_timestamp_seconds") == 2000
    assert value(gateway, flow, "tapeline_drain_rows_total", **rows) == 200
    rejects = {"sink": "postgres", "topic": "market.trades.raw"}
    assert value(gateway, flow, "tapeline_drain_rejects_total", **rejects) == 3
    # No per-process series leak into the pushed group.
    names = {name for name, _ in group(gateway, flow)}
    assert not any(name.endswith("_created") or name.startswith("process_") for name in names)


def test_one_process_pushing_twice_counts_once(gateway: str) -> None:
    from prometheus_client import CollectorRegistry, Counter

    flow = f"drain-{uuid.uuid4().hex[:8]}"
    rows = Counter("tapeline_drain_rows", "rows", ("sink", "table"), registry=CollectorRegistry())
    rows.labels(sink="mongo", table="wallets").inc(5)
    assert observe.push_drain_metrics(flow, [rows], url=gateway)
    assert observe.push_drain_metrics(flow, [rows], url=gateway)
    labels = {"sink": "mongo", "table": "wallets"}
    assert value(gateway, flow, "tapeline_drain_rows_total", **labels) == 5
    rows.labels(sink="mongo", table="wallets").inc(2)
    assert observe.push_drain_metrics(flow, [rows], url=gateway)
    assert value(gateway, flow, "tapeline_drain_rows_total", **labels) == 7


def test_another_flows_gauge_stays_out_of_this_group(gateway: str) -> None:
    from prometheus_client import CollectorRegistry, Gauge

    flow, other = f"drain-{uuid.uuid4().hex[:8]}", f"drain-{uuid.uuid4().hex[:8]}"
    last = Gauge(
        "tapeline_drain_last_success_timestamp_seconds", "last", ("flow",),
        registry=CollectorRegistry(),
    )  # fmt: skip
    last.labels(flow=flow).set(10)
    last.labels(flow=other).set(20)
    # The gateway refuses a push whose `flow` label differs from the grouping key.
    assert observe.push_drain_metrics(flow, [last], url=gateway)
    assert value(gateway, flow, "tapeline_drain_last_success_timestamp_seconds") == 10
    assert group(gateway, other) == {}


def test_no_gateway_means_no_push_and_no_error() -> None:
    assert config.load({}).pushgateway_url == ""
    assert config.load({"TAPELINE_PUSHGATEWAY_URL": " http://pg:9091 "}).pushgateway_url == (
        "http://pg:9091"
    )
    assert observe.push_drain_metrics("drain-prices", url="") is False
    closed = f"http://127.0.0.1:{free_port()}"
    assert observe.push_drain_metrics("drain-prices", url=closed, timeout=1) is False


def test_a_drain_flow_run_pushes_its_metrics(gateway: str, kafka, postgres, new_topic) -> None:
    """The real drain flow, in its own process like a worker's flow run, pushes on success."""
    from tests.drain.support import pg_schema, publish, trades

    topic, quotes, books = new_topic(partitions=2), new_topic(partitions=1), new_topic(1)
    publish(kafka, topic, trades(25, venue="pushtest"))
    with pg_schema(kafka.pg_dsn) as schema:
        code = (
            "from flows.drain import drain_prices\n"
            f"drain_prices(trades_topic={topic!r}, quotes_topic={quotes!r}, books_topic={books!r},"
            f" consumer='push-{uuid.uuid4().hex[:8]}', schema={schema!r}, max_seconds=20)\n"
        )
        env = {**os.environ, "TAPELINE_PUSHGATEWAY_URL": gateway}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = value(gateway, "drain-prices", "tapeline_drain_rows_total", sink="postgres",
                 table="trades")  # fmt: skip
    assert rows is not None and rows >= 25
    assert value(gateway, "drain-prices", "tapeline_drain_last_success_timestamp_seconds")
