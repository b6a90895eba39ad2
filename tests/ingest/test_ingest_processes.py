"""Ingestion across child processes (``processes`` > 1) against the simulator and the real
local Kafka: every trade id once and in order per symbol with two processes; a SIGKILLed
process is restarted and its downtime repaired from REST; a process that keeps dying
fails the run with its name and exit status, leaving no process behind; the run's one
metrics endpoint holds every process's series."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from flows.ingest import ingest
from simulator.process import SimulatorProcess
from tasks.core import metrics
from tasks.ingest import processes
from tasks.ingest.lease import clock
from tasks.ingest.live import plan
from tasks.ingest.publish import Topics
from tests.ingest.support import assert_contiguous, first_sent, read_topic, trade_ids
from tests.ports import free_port

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT"]


def _sim(*faults: str, rate: int = 400) -> SimulatorProcess:
    args = ["--symbols", ",".join(SYMBOLS), "--rate", str(rate), "--shutdown-grace", "0.3"]
    for f in faults:
        args += ["--fault", f]
    return SimulatorProcess(*args)


def _children() -> list[int]:
    """Running ingestion child processes of this (the test's) process, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and b"tasks.ingest.processes" in cmdline:
            found.append(int(entry))
    return sorted(found)


def _run(sim: SimulatorProcess, trades: str, seconds: float) -> dict:
    return ingest(
        venue="binance", symbols=SYMBOLS, channels=["trades"], shard_size=1, processes=2,
        simulator_url=sim.http_url, validate_mode="off", metrics_port=0, stall_timeout_s=3,
        run_seconds=seconds, trades_topic=trades, progress_every_s=2,
    )  # fmt: skip


def test_two_processes_publish_every_trade_once_in_id_order(
    kafka, postgres, prefect_server, new_topic
):
    trades = new_topic(3)
    with _sim("binance:gap_every=97,gap_size=3,dup_every=89") as sim:
        report = _run(sim, trades, 3)
        final = sim.report()

    assert report["sent"] == report["acked"] > 500 and report["failed"] == 0
    assert report["unresolved_at_exit"] == 0 and not report["shard_errors"]
    assert report["gaps_repaired"] >= 1 and report["duplicates_dropped"] >= 1
    procs = report["processes"]
    assert [p["shards"] for p in procs] == [[0, 2], [1, 3]]
    assert all(p["restarts"] == 0 and p["report"]["acked"] > 0 for p in procs), procs
    assert [s["shard"] for s in report["shards"]] == ["0", "1", "2", "3"]
    assert len({p["lives"][0]["pid"] for p in procs} | {os.getpid()}) == 3

    ids = trade_ids(kafka, trades)
    assert sorted(ids) == sorted(SYMBOLS)
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)
        assert ids[symbol][0] == first_sent(final, symbol)
    assert sum(map(len, ids.values())) == report["acked"]
    assert report["last_trade_ids"] == {s: i[-1] for s, i in ids.items()}
    assert _children() == []


def _until(what: str, done, sup: processes.Supervisor, timeout_s: float = 60.0) -> None:
    """Supervise until ``done()`` (liveness bound: process starts on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert sup.alive, f"the run ended while waiting for {what}: {sup.failed or sup.fenced}"
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.05)


def _streaming(sup: processes.Supervisor) -> bool:
    """Every child's current process has had a trade acknowledged."""
    return all(s.current and (s.current.status or {}).get("acked", 0) > 0 for s in sup.slots)


def _supervisor(
    kafka, sim: SimulatorProcess, trades: str, metrics_port: int = 0
) -> processes.Supervisor:
    p = plan("binance", SYMBOLS, ["trades"], shard_size=1, simulator_url=sim.http_url)
    return processes.Supervisor(
        p, kafka, 2, run_id=f"test-{trades}", topics=Topics(trades), status_every_s=0.2,
        metrics_port=metrics_port,
    )  # fmt: skip


def test_a_killed_process_is_restarted_and_its_downtime_repaired(kafka, new_topic):
    """SIGKILL one child: the supervisor starts it again, the new process reads its
    symbols' last trades back from Kafka and repairs the downtime from REST first."""
    trades = new_topic(3)
    with _sim(rate=400) as sim:
        sup = _supervisor(kafka, sim, trades)
        sup.start()
        try:
            _until("both processes to publish", lambda: _streaming(sup), sup)
            victim = sup.slots[0]
            os.kill(victim.current.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            at_kill = {s: m["last_id"] for s, m in sim.report()["markets"].items()}
            back = lambda: len(victim.lives) == 2 and _streaming(sup)  # noqa: E731
            _until("the killed process to be back", back, sup)
            time.sleep(1)  # and streaming live for a while
        finally:
            report = sup.stop()
        final = sim.report()

    hit, other = report["processes"]
    assert hit["restarts"] == 1 and other["restarts"] == 0, report["processes"]
    assert [life["ended"] for life in hit["lives"]] == [
        "killed by SIGKILL",
        "exit status 0 (stopped)",
    ]
    assert hit["report"]["trades_repaired"] > 0  # the downtime, from REST
    assert report["failed"] == 0 and report["unresolved_at_exit"] == 0

    ids = trade_ids(kafka, trades)
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)  # the downtime was repaired, nothing twice
        assert ids[symbol][0] == first_sent(final, symbol)
    for symbol in hit["symbols"]:
        assert ids[symbol][-1] > at_kill[symbol]  # it went on after the kill
    assert report["last_trade_ids"] == {s: i[-1] for s, i in ids.items()}
    assert _children() == []


def test_children_publish_only_until_the_fence_point_the_parent_sent(kafka, new_topic):
    """The lease's fence point reaches the children: each renewal (``extend``) lets them
    publish longer, and without one they stop by themselves at the last point sent:
    no record of theirs is stamped later (kafka-python stamps a record in ``send``, which
    the lane calls only after its fence check)."""
    trades = new_topic(3)
    with _sim(rate=400) as sim:
        sup = _supervisor(kafka, sim, trades)
        sup.start()
        try:
            _until("both processes to publish", lambda: _streaming(sup), sup)
            sup.extend(clock() + 3)  # the lease is taken: a first fence point
            first_wall = time.time() + 3
            time.sleep(0.5)
            until = clock() + 5.5  # a renewal: 3 s beyond the first point
            sup.extend(until)
            fence_wall = time.time() + (until - clock())
            deadline = time.monotonic() + 30  # liveness: a busy machine
            while sup.alive:
                assert time.monotonic() < deadline, "still publishing 30 s on"
                time.sleep(0.05)
        finally:
            report = sup.stop()
    assert sup.fenced is not None and sup.fenced.startswith("fenced: "), sup.fenced
    assert time.time() >= fence_wall - 0.5
    lives = [life for proc in report["processes"] for life in proc["lives"]]
    assert [life["exit"] for life in lives] == [processes.EXIT_FENCED] * 2, lives
    stamps = [r.timestamp for recs in read_topic(kafka, trades).values() for r in recs]
    # A send checked the fence just before the point may be stamped a little after it
    # (kafka-python stamps inside send; a loaded machine can pause the thread between):
    # 250 ms of that, where the points are 3 s apart.
    late = max(stamps) - fence_wall * 1000
    assert stamps and late <= 250, late
    assert max(stamps) > first_wall * 1000, "the renewal did not reach the children"
    assert _children() == []


def test_a_process_that_keeps_dying_fails_the_run(
    kafka, postgres, prefect_server, new_topic, monkeypatch
):
    trades = new_topic(3)
    real = processes.child_command
    broken = [
        sys.executable, "-c",
        "import sys; print('cannot start: tasks.ingest.processes broken', file=sys.stderr); "
        "sys.exit(3)",
    ]  # fmt: skip
    monkeypatch.setattr(processes, "child_command", lambda i: broken if i == 0 else real(i))
    with _sim(rate=100) as sim:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            _run(sim, trades, 180)
        took = time.monotonic() - t0

    message = str(failed.value)
    assert "ingestion process 0 (shards 0,2: BTC-USDT, SOL-USDT)" in message, message
    assert "exit status 3" in message and "cannot start" in message, message
    assert "died 4 times within 60 s" in message, message
    assert took < 90, f"gave up only after {took:.0f} s"  # the error, not the 180 s clock
    assert _children() == []  # process 1 was stopped too


def test_processes_is_checked_like_the_other_parameters():
    from flows.ingest import _check
    from tasks.core.params import ParameterError

    given = {
        "venue": "binance", "symbols": None, "trades_topic": "t.trades",
        "quotes_topic": "t.quotes", "books_topic": "t.books", "book_depth": 10,
        "book_snapshot_s": 10.0, "max_in_flight": 100, "stall_timeout_s": 30.0,
        "first_message_timeout_s": 15.0, "run_seconds": None, "validate_mode": "off",
    }  # fmt: skip
    _check(**given, processes=2)
    for bad in (0, 65, True, 2.5):
        with pytest.raises(ParameterError, match="processes"):
            _check(**given, processes=bad)


# ---- the run's one metrics endpoint ---------------------------------------------------------


def _page(port: int, accept: str | None = None) -> str:
    """A metrics page as Prometheus gets it (the 0.0.4 text format unless ``accept``)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    ask = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        ask.add_header("Accept", accept)
    with no_proxy.open(ask, timeout=10) as r:
        return r.read().decode()


def _valid(text: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted labels: value}}`` of a text page, asserting what Prometheus
    needs of it: it parses, and each family has one TYPE line."""
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _child_like(shard: str, acked: int) -> tuple[CollectorRegistry, int]:
    """A registry with one shard's publish counter (and a histogram), served on a
    loopback port the OS picks, as a child serves its own."""
    registry = CollectorRegistry()
    counter = Counter("kafka_publish_success", "acked", ("venue", "shard"), registry=registry)
    counter.labels(venue="v", shard=shard).inc(acked)
    Histogram("tapeline_event_to_ack_seconds", "latency", registry=registry).observe(0.02)
    server, _ = start_http_server(0, "127.0.0.1", registry)
    return registry, server.server_port


class _Merged:
    """A collector of fixed sources' families, merged as the parent's endpoint merges."""

    def __init__(self, sources: dict[str, list]):
        self.sources = sources

    def collect(self) -> list:
        return metrics.merge(self.sources, "p")


def _by_process(series: dict[tuple, float]) -> dict[tuple, float]:
    """A family's children's series (the test process's own, labelled ``supervisor``,
    counts whatever earlier tests in this process published)."""
    return {k: v for k, v in series.items() if ("process", "supervisor") not in k}


def test_merged_pages_read_back_as_each_process_served_them():
    """Two child-like processes' pages, fetched over HTTP and merged: one family per name,
    every sample labelled with its process, each counter reads back as it was served, and
    the OpenMetrics rendering (what Prometheus asks for first) parses too."""
    (reg0, port0), (reg1, port1) = _child_like("0", 7), _child_like("1", 11)
    sources = {"0": metrics.fetch(port0, 2.0), "1": metrics.fetch(port1, 2.0)}
    merged = CollectorRegistry()
    merged.register(_Merged(sources))

    back = _valid(generate_latest(merged).decode())
    for p, reg in (("0", reg0), ("1", reg1)):
        for name, series in _valid(generate_latest(reg).decode()).items():
            for labels, value in series.items():
                assert back[name][tuple(sorted((*labels, ("p", p))))] == value, (name, labels)
    acked = back["kafka_publish_success_total"]
    assert acked == {
        (("p", "0"), ("shard", "0"), ("venue", "v")): 7.0,
        (("p", "1"), ("shard", "1"), ("venue", "v")): 11.0,
    }
    om = om_exposition.generate_latest(merged).decode()
    families = {f.name: f for f in om_parser.text_string_to_metric_families(om)}
    assert families["kafka_publish_success"].type == "counter"
    assert {s.name for s in families["kafka_publish_success"].samples} == {
        "kafka_publish_success_total", "kafka_publish_success_created",
    }  # fmt: skip


def test_a_child_that_does_not_answer_is_left_out_of_the_scrape_once_logged(
    kafka, monkeypatch, caplog
):
    """One child answers, the other accepts the connection and never answers (frozen):
    every scrape still succeeds, with the answering child's and the supervisor's series,
    and the silent one is logged once, not on every scrape."""
    monkeypatch.setattr(processes, "GATHER_TIMEOUT_S", 0.3)
    _, port0 = _child_like("0", 5)
    frozen = socket.create_server(("127.0.0.1", 0))  # listens, never accepts
    p = plan("binance", SYMBOLS, ["trades"], shard_size=1, simulator_url="http://127.0.0.1:9")
    port = free_port()
    sup = processes.Supervisor(
        p, kafka, 2, run_id="test-gather", metrics_port=port, logger=logging.getLogger("t")
    )
    stand_ins = [subprocess.Popen(["sleep", "60"]) for _ in sup.slots]  # "running" children
    try:
        for slot, proc, child_port in zip(
            sup.slots, stand_ins, (port0, frozen.getsockname()[1]), strict=True
        ):
            life = processes._Incarnation(proc, time.monotonic(), metrics_port=child_port)
            slot.lives.append(life)
        sup._serve()
        with caplog.at_level(logging.WARNING, "t"):
            pages = [_valid(_page(port)) for _ in range(2)]
    finally:
        sup._close_endpoint()
        frozen.close()
        for proc in stand_ins:
            proc.kill()
            proc.wait()
    for page in pages:
        assert _by_process(page["kafka_publish_success_total"]) == {
            (("process", "0"), ("shard", "0"), ("venue", "v")): 5.0
        }
        assert (("process", "supervisor"),) in page["process_cpu_seconds_total"]
        assert {dict(k)["process"] for k in page["process_cpu_seconds_total"]} == {"supervisor"}
    left_out = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1, [r.getMessage() for r in left_out]
    assert f"pid {stand_ins[1].pid}" in left_out[0].getMessage()


def _acked_by_shard(sup: processes.Supervisor) -> dict[str, int]:
    """Acked per shard, from the children's last status lines."""
    return {
        s["shard"]: s["acked"]
        for slot in sup.slots
        for s in ((slot.current.status if slot.current else None) or {}).get("shards", [])
    }


def _quiet(sup: processes.Supervisor, timeout_s: float = 60.0) -> dict[str, int]:
    """Acked per shard once nothing is in flight and it held still for 3 s (five reads
    0.6 s apart: a child starved for a second sends stale lines, not a still count)."""
    deadline = time.monotonic() + timeout_s
    before: dict[str, int] | None = None
    still = 0
    while True:
        time.sleep(0.6)
        now = _acked_by_shard(sup)
        idle = all(s.current and s.current.status["in_flight"] == 0 for s in sup.slots)
        still = still + 1 if now == before and idle else 0
        if still >= 5:
            return now
        assert time.monotonic() < deadline, f"still acking {timeout_s:.0f} s on: {now}"
        before = now


def test_the_parent_serves_every_process_metrics_on_one_port(kafka, new_topic):
    """Two processes, one scrape target: the parent's ``metrics_port`` holds each child's
    per-shard publish counter, labelled with its process, and they add up to what the run
    acked. Compared while the simulator holds every connection still (no trade arrives,
    so a counter cannot move between the status line, the scrape and the report)."""
    trades = new_topic(3)
    port = free_port()
    with _sim(rate=200) as sim:
        sup = _supervisor(kafka, sim, trades, metrics_port=port)
        sup.start()
        try:
            _until("both processes to publish", lambda: _streaming(sup), sup)
            sim.inject("stall", seconds=30)
            quiet = _quiet(sup)
            page = _valid(_page(port))
            assert _acked_by_shard(sup) == quiet, "acked moved during the scrape"
        finally:
            report = sup.stop()

    scraped = {
        dict(labels)["shard"]: (dict(labels)["process"], value)
        for labels, value in _by_process(page["kafka_publish_success_total"]).items()
    }
    assert scraped == {
        "0": ("0", quiet["0"]), "1": ("1", quiet["1"]),
        "2": ("0", quiet["2"]), "3": ("1", quiet["3"]),
    }  # fmt: skip
    assert sum(v for _, v in scraped.values()) == report["acked"] > 0
    assert {dict(k)["process"] for k in page["process_cpu_seconds_total"]} == {
        "supervisor", "0", "1",
    }  # fmt: skip
    with pytest.raises(OSError):  # the endpoint ended with the run
        _page(port)
    assert _children() == []
