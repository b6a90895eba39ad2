"""Ingestion across child processes (``processes`` > 1) against the simulator and the real
local Kafka: every trade id once and in order per symbol with two processes; a SIGKILLed
process is restarted and its downtime repaired from REST; a process that keeps dying
fails the run with its name and exit status, leaving no process behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from flows.ingest import ingest
from simulator.process import SimulatorProcess
from tasks.ingest import processes
from tasks.ingest.lease import clock
from tasks.ingest.live import plan
from tasks.ingest.publish import Topics
from tests.ingest.support import assert_contiguous, first_sent, read_topic, trade_ids

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


def _supervisor(kafka, sim: SimulatorProcess, trades: str) -> processes.Supervisor:
    p = plan("binance", SYMBOLS, ["trades"], shard_size=1, simulator_url=sim.http_url)
    return processes.Supervisor(
        p, kafka, 2, run_id=f"test-{trades}", topics=Topics(trades), status_every_s=0.2
    )


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
            sup.extend(clock() + 1.5)  # the lease is taken: a first fence point
            first_wall = time.time() + 1.5
            time.sleep(0.5)
            until = clock() + 2.5  # a renewal: 1.5 s beyond the first point
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
    assert stamps and max(stamps) <= fence_wall * 1000 + 5, max(stamps) - fence_wall * 1000
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
            _run(sim, trades, 60)
        took = time.monotonic() - t0

    message = str(failed.value)
    assert "ingestion process 0 (shards 0,2: BTC-USDT, SOL-USDT)" in message, message
    assert "exit status 3" in message and "cannot start" in message, message
    assert "died 4 times within 60 s" in message, message
    assert took < 30, f"gave up only after {took:.0f} s"
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
