"""The real Prometheus server (Debian's ``prometheus``) scraping real Tapeline processes.

On the local stack: the simulator, the ingestion flow (``python -m flows.ingest``) into
fresh topics, and the exporter, all as child processes on loopback; Prometheus scrapes
the ingestion endpoint and the exporter every second and evaluates a test copy of the
rule file with short ``for:`` durations. The test reads back the ingestion rate, the
consumer lag and the freshness through the HTTP API, checks them against what Kafka and
PostgreSQL hold, runs every dashboard query on the live server, then stalls the
simulator's Binance stream and waits for TapelineVenueSilent to go pending and firing.

Until ``flows/drain.py`` exists, the trades behind the freshness reading are copied from
the ingested topic into a private ``trades`` table by ``store_trades`` below.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from simulator.process import SimulatorProcess
from tasks.core import codec
from tasks.core.events import Trade
from tasks.core.kafka import consumer
from tests.ingest.support import SIM_VENUE
from tests.ports import free_port
from tests.telemetry.test_monitoring import DASHBOARD_FILES, all_panels

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "rules" / "tapeline.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
SYMBOLS = ("BTC-USDT", "ETH-USDT")
RATE = 100  # simulator trades/s over all symbols
SILENCE_S = 3  # the test copy's TapelineVenueSilent threshold (30 in the real rules)


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


class Prometheus:
    """A Prometheus server on a free loopback port with its own data directory."""

    def __init__(self, binary: str, config: Path, workdir: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out, stderr=out,
            )  # fmt: skip
        wait_for("Prometheus to be ready", self._ready, 60)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's result as {sorted labels: value}."""
        data = self.api("query", query=expr)
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def shortened_rules(workdir: Path) -> Path:
    """The rule file with TapelineVenueSilent shortened to fire within seconds."""
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    found = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "TapelineVenueSilent":
                assert rule["expr"].rstrip().endswith("> 30"), rule["expr"]
                rule["expr"] = re.sub(r"> 30\s*$", f"> {SILENCE_S}", rule["expr"])
                rule["for"] = "2s"
                found += 1
    assert found == 1
    path = workdir / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    return path


def store_trades(settings, topic: str, conn, start: dict[int, int]) -> dict[int, int]:
    """Copy the trades published since ``start`` into ``trades``; returns the new start."""
    c = consumer(None, settings)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        ends = c.end_offsets(tps)
        for tp in tps:
            c.seek(tp, start.get(tp.partition, 0))
        rows = []
        deadline = time.monotonic() + 60  # liveness: reading back what was just published
        while any(c.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, records in c.poll(timeout_ms=500).items():
                for r in records:
                    if r.offset < ends[tp]:
                        t = codec.decode(r.value)
                        assert isinstance(t, Trade)
                        rows.append((t.venue, t.symbol, t.trade_id, t.event_us))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO trades VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", rows
            )
        return {tp.partition: c.position(tp) for tp in tps}
    finally:
        c.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tapeline-prom-") as path:
        yield Path(path)


@pytest.fixture
def trades_schema(pg_conn) -> Iterator[tuple[Any, str]]:
    schema = f"test_{uuid.uuid4().hex[:8]}"
    pg_conn.autocommit = True
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        cur.execute(f"SET search_path = {schema}")
        cur.execute(
            "CREATE TABLE trades (venue text, symbol text, trade_id bigint, event_us bigint,"
            " PRIMARY KEY (venue, symbol, trade_id))"
        )
    yield pg_conn, schema
    with pg_conn.cursor() as cur:
        cur.execute(f"DROP SCHEMA {schema} CASCADE")


def test_prometheus_sees_the_pipeline_and_fires_on_a_stall(
    kafka, postgres, prefect_server, new_topic, trades_schema, workdir
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        msg = "prometheus not installed (Debian package 'prometheus'; scripts/bootstrap.sh)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    conn, schema = trades_schema
    trades, quotes = new_topic(3), new_topic(1)
    group = f"tapeline.live-{uuid.uuid4().hex[:8]}"
    # The group has read nothing yet: its lag is everything published.
    c = consumer(group, kafka)
    c.commit({TopicPartition(trades, p): OffsetAndMetadata(0, "", -1) for p in range(3)})
    c.close()

    ingest_port, exporter_port = free_port(), free_port()
    children: list[subprocess.Popen] = []
    prometheus = None
    sim_args = ("--rate", str(RATE), "--symbols", ",".join(SYMBOLS))
    with contextlib.ExitStack() as logs, SimulatorProcess(*sim_args) as sim:
        try:
            children.append(subprocess.Popen(
                [
                    sys.executable, "-m", "flows.ingest", "--simulator", sim.http_url,
                    "--symbols", ",".join(SYMBOLS), "--trades-topic", trades,
                    "--quotes-topic", quotes, "--validate", "off",
                    "--metrics-port", str(ingest_port), "--seconds", "85",
                    "--stall-timeout", "60", "--progress-every", "5",
                ],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=logs.enter_context(
                    open(workdir / "ingest.log", "wb")),
            ))  # fmt: skip
            dsn = kafka.pg_dsn + ("&" if "?" in kafka.pg_dsn else "?")
            dsn += urllib.parse.urlencode({"options": f"-csearch_path={schema}"})
            children.append(subprocess.Popen(
                [
                    sys.executable, "-m", "tasks.telemetry.exporter", "--host", "127.0.0.1",
                    "--port", str(exporter_port), "--interval", "1", "--group-prefix", group,
                ],
                cwd=ROOT, env={**os.environ, "TAPELINE_PG_DSN": dsn},
                stdout=subprocess.DEVNULL, stderr=logs.enter_context(
                    open(workdir / "exporter.log", "wb")),
            ))  # fmt: skip
            config = workdir / "prometheus.yml"
            config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(shortened_rules(workdir))],
                "scrape_configs": [
                    {"job_name": "tapeline-ingest",
                     "static_configs": [{"targets": [f"127.0.0.1:{ingest_port}"]}]},
                    {"job_name": "tapeline-exporter",
                     "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]},
                ],
            }))  # fmt: skip
            prometheus = Prometheus(binary, config, workdir)

            def running() -> None:
                for proc, log in zip(children, ("ingest.log", "exporter.log"), strict=True):
                    assert proc.poll() is None, (workdir / log).read_text()[-3000:]

            # Ingestion rate per venue, from the ingestion endpoint.
            def ingest_rate() -> float:
                running()
                result = prometheus.query("sum by (venue) (rate(vendor_fetch_success_total[5s]))")
                return result.get((("venue", SIM_VENUE),), 0.0)

            rate = wait_for("an ingestion rate", ingest_rate, 120)
            # Trade frames at RATE/s plus quotes; far from zero and from absurd.
            assert RATE / 4 < rate < RATE * 10, rate
            up = prometheus.query("up")
            assert set(up.values()) == {1.0} and len(up) == 2, up

            # Consumer lag: the group committed 0, so its lag is what the topic holds.
            def lag() -> float:
                result = prometheus.query(f'sum(tapeline_consumer_lag{{group="{group}"}})')
                return next(iter(result.values()), 0.0)

            seen_lag = wait_for("consumer lag", lag, 60)
            c = consumer(None, kafka)
            ends = c.end_offsets([TopicPartition(trades, p) for p in range(3)])
            c.close()
            assert 0 < seen_lag <= sum(ends.values())
            partitions = prometheus.query(f'tapeline_consumer_lag{{group="{group}"}}')
            assert {dict(k)["topic"] for k in partitions} == {trades}

            # Freshness of what is stored: the newest trade per symbol, seconds old.
            store_trades(kafka, trades, conn, {})
            stored_at = time.time()

            def fresh() -> dict:
                result = prometheus.query("tapeline_freshness_seconds")
                return {dict(k)["symbol"]: v for k, v in result.items()} if result else None

            ages = wait_for("freshness", fresh, 60)
            assert set(ages) == set(SYMBOLS)
            # 60 s: scrape and rule intervals on a loaded machine
            assert all(0 <= age < time.time() - stored_at + 60 for age in ages.values()), ages

            # Every dashboard query runs on the real server.
            for path in DASHBOARD_FILES:
                for panel in all_panels(json.loads(path.read_text(encoding="utf-8"))):
                    for target in panel.get("targets", []):
                        if "expr" in target:
                            expr = target["expr"].replace("$__rate_interval", "5s")
                            prometheus.api("query", query=expr.replace("$venue", ".*"))

            # A stall: Binance stops writing, the connection stays open.
            assert prometheus.alerts("TapelineVenueSilent") == []
            sim.inject("stall", venue="binance", seconds=25)

            def alert_state(*states: str) -> Callable[[], Any]:
                def check() -> Any:
                    running()
                    return [
                        a
                        for a in prometheus.alerts("TapelineVenueSilent")
                        if a["labels"]["venue"] == SIM_VENUE and a["state"] in states
                    ]

                return check

            pending = wait_for("TapelineVenueSilent pending", alert_state("pending", "firing"), 60)
            firing = wait_for("TapelineVenueSilent firing", alert_state("firing"), 60)
            assert pending and firing[0]["labels"]["severity"] == "critical"
            assert f"No messages from {SIM_VENUE}" in firing[0]["annotations"]["summary"]
        finally:
            if prometheus is not None:
                prometheus.stop()
            for proc in children:
                proc.terminate()
            for proc in children:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
