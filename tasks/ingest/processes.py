"""Ingestion across processes: one run's shards spread over N supervised child processes.

Why: one ingestion process reads, parses and publishes every frame under one GIL, so a
run uses one core whatever its shard count. With ``processes`` N > 1 the flow run (the
*parent*) starts N children; child ``i`` runs the plan's shards ``i, i+N, i+2N, ...``
(``Ingestion(shards=...)``: a shard keeps its index as its name) with its own producer.
Per-symbol order holds as in one process: a symbol is in exactly one shard, a shard in
exactly one child, and that child's producer is idempotent with ``acks=all``. The
in-flight bound ``max_in_flight`` is the run's: each child gets its shards' share.

Process model. A child is ``python -m tasks.ingest.processes`` started with
``subprocess`` (not ``multiprocessing``): it imports only the ingestion (no Prefect, and
not the parent's ``__main__``, which under a worker is Prefect's engine), ``ps`` shows
what it is, ``Popen`` gives its exit status, and the command is one list a test can
replace. The parent writes the child's spec (plan, settings, shards, resume point,
fence point; pickled, base64, one line) and then commands as JSON lines to its stdin;
the child answers with JSON lines on its stdout (a status every ``status_every_s``: the
counts of its ``Ingestion.report`` plus lag, in-flight and event->ack p50/p99; and a
final ``report``). Its stderr (its log) is read by the parent and logged with the
child's name, in the flow run's log. A child ignores SIGINT (Ctrl-C reaches the whole
process group; the parent decides), takes SIGTERM or EOF on stdin (the parent is gone)
as "stop and flush".

Supervision. The parent polls its children (``alive``, every 0.2 s from the flow's
loop). A child that exits when not asked to (crash, SIGKILL, its producer died) is
started again: at once the first time, then after 0.5, 1, 2 s; the new child reads its
symbols' last trades back from Kafka (``tasks.ingest.resume``, as a new run does) and its
gap trackers repair the downtime from REST before its first live trade. A child that
dies more than ``max_restarts`` times within ``window_s`` (3 in 60 s) fails the run: its
error names the process, its shards and symbols, its exit status and the last lines of
its log; every other child is stopped and flushed, none is left running. Stopping the
run (``run_seconds``, cancellation, SIGTERM) sends every child "stop", waits for its
flush and report (then kills what is left) and returns the summed report with one
section per process (``processes``). A killed child's counts are those of its last
status line (at most ``status_every_s`` old); what it published is in Kafka whatever
its counts say. The new child reads its resume point back only after the old one's exit
was seen and a new interpreter has started (a second or more): a produce request the
dead process had already written to its socket has reached the broker by then, so the
read-back sees it. (A broker stalled longer than that could append such a record after
the new child's copy of it: a duplicate, which the drains' natural keys absorb.)

The lease still fences, across processes. Only the parent holds the lease of the run's
symbols (``tasks.ingest.lease``: a row per symbol, all children's included, taken, renewed
and released together) and renews it; a child never talks to PostgreSQL. The fence
point is a value of ``lease.clock`` (CLOCK_BOOTTIME, one clock for every process on the
host), so it means the same in the child:

- a child starts with the fence point in force (``valid_until`` in its spec) and sets it
  on its publisher before its first send; every renewal sends it the new point
  (``{"extend": t}``); its lanes refuse every send from that point on, on their own,
  exactly as in one process. A late or lost update can only make a child stop *earlier*
  (its point never moves on without a renewal the parent made). A parent that froze or
  died sends nothing more, so its children stop at the last point it sent.
- on losing the lease (any symbol's row taken, or not renewed in time) the parent sends
  ``{"fence": reason}`` to every child at once (the child fences its publisher, stops its
  shards and aborts its producer's unsent records, exit status ``EXIT_FENCED``), and kills
  any child still running ``FENCE_KILL_S`` later; a child starting meanwhile is not
  started again.
- commands are written without blocking (each line is shorter than PIPE_BUF, so it is
  written whole or not at all): a frozen child cannot stall the parent's lease thread.
- the parent flushes children only while the lease surely holds (the flow passes the
  lease's remaining time as the flush timeout; the child bounds it by its own point).

Metrics. The parent serves the whole run's metrics on ``metrics_port``, the one scrape
target whatever N (the scrape configs name one port per ingestion pod; a child serving
``metrics_port + i`` would go unscraped, a silent undercount). Each child serves its own
process's metrics on a loopback port the OS picks and tells the parent which (a
``metrics_port`` line, before its first status). On each scrape the parent's endpoint
asks every running child for its page at once (OpenMetrics, at most
``GATHER_TIMEOUT_S``), adds label ``process`` to every sample (the child's index;
``supervisor`` for the parent's own process metrics) and merges families of one name,
so the page has one HELP and TYPE per family and each series is the child's own,
counters included: summing over ``process`` gives the run. A child that does not answer
is left out of that scrape (logged once per started process), never failing it; its
series are absent meanwhile, as a dead child's are. prometheus_client's multiprocess
mode was the alternative; it needs a shared directory set before import in every
process, drops ``Gauge`` semantics to per-pid modes and leaves files behind dead
children. A restarted child starts its counters at zero again under the same
``process`` label, which ``rate()`` treats as a counter reset. The endpoint closes when
the run stops. The parent's progress line sums the children's status lines.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from tasks.core import config, metrics
from tasks.core.events import Trade
from tasks.ingest import resume
from tasks.ingest.lease import clock
from tasks.ingest.live import _SUMMED, Ingestion, Plan, freeze_heap
from tasks.ingest.publish import Topics
from tasks.venues.connection import ConnectionPolicy

log = logging.getLogger("tasks.ingest.processes")  # also when run as __main__

EXIT_FENCED = 75  # the child stopped publishing because the lease's fence point passed
EXIT_FAILED = 70  # the child stopped by itself: a shard died, or its producer did
FENCE_KILL_S = 3.0  # after a fence, children still running are killed
STOP_GRACE_S = 15.0  # beyond the flush timeout, for a child to close and report
GATHER_TIMEOUT_S = 2.0  # a child's page, per scrape of the parent's endpoint
_LEVELS = {n: getattr(logging, n) for n in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}


def child_command(index: int) -> list[str]:
    """How child ``index`` is started (tests replace this to make one unable to start)."""
    return [sys.executable, "-m", "tasks.ingest.processes"]


@dataclass(frozen=True)
class ChildSpec:
    """Everything one child needs; pickled to its stdin (parent and child run one code)."""

    index: int
    shards: tuple[int, ...]
    plan: Plan
    settings: config.Settings
    run_id: str
    topics: Topics
    max_in_flight: int
    policy: ConnectionPolicy
    last_trades: dict[str, Trade] | None  # None: read back from Kafka (a restart)
    valid_until: float | None  # the fence point (lease.clock); None: no lease
    serve_metrics: bool  # on a loopback port the OS picks, for the parent to gather
    status_every_s: float


def describe_exit(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return {
        0: "exit status 0 (stopped)",
        EXIT_FENCED: f"exit status {EXIT_FENCED} (fenced)",
        EXIT_FAILED: f"exit status {EXIT_FAILED} (a shard or its producer failed)",
    }.get(status, f"exit status {status}")


@dataclass
class _Incarnation:
    """One started child process of a slot."""

    proc: subprocess.Popen
    started: float
    status: dict[str, Any] | None = None  # its last status line
    report: dict[str, Any] | None = None  # its final report
    exit: int | None = None
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    ready: bool = False  # spec written: commands may follow
    metrics_port: int | None = None  # where it serves its metrics (loopback), once it said
    unanswered: bool = False  # a gather found its metrics port silent (logged once)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, Any] | None:
        return self.report or self.status


@dataclass
class _Slot:
    """Child ``index``: its shards, and every process that has run them."""

    index: int
    shards: tuple[int, ...]
    symbols: list[str]
    lives: list[_Incarnation] = field(default_factory=list)
    deaths: list[float] = field(default_factory=list)  # monotonic times of unasked exits
    restart_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def current(self) -> _Incarnation | None:
        return self.lives[-1] if self.lives else None

    def name(self) -> str:
        shards = ",".join(map(str, self.shards))
        return f"ingestion process {self.index} (shards {shards}: {', '.join(self.symbols)})"


class Supervisor:
    """The parent's side: starts, watches, restarts, fences and stops the children.

    Duck-types what the flow drives of an ``Ingestion``: ``alive``, ``extend``,
    ``fence``, ``fence_reason``, ``update_gauges``, ``progress``, ``stop``.
    """

    def __init__(
        self,
        plan: Plan,
        settings: config.Settings,
        processes: int,
        *,
        run_id: str,
        topics: Topics | None = None,
        max_in_flight: int = 10_000,
        policy: ConnectionPolicy | None = None,
        last_trades: dict[str, Trade] | None = None,
        metrics_port: int = 0,
        max_restarts: int = 3,
        window_s: float = 60.0,
        status_every_s: float = 1.0,
        logger: Any = None,
    ):
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        n = min(processes, len(plan.shards))
        self.plan = plan
        self.settings = settings
        self.run_id = run_id
        self.topics = topics or Topics()
        self.max_in_flight = max_in_flight
        self.policy = policy or ConnectionPolicy()
        self.last_trades = last_trades or {}
        self.metrics_port = metrics_port
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.status_every_s = status_every_s
        self.logger = logger or log
        self.slots = []
        for i in range(n):
            shards = tuple(range(i, len(plan.shards), n))
            mine = {s for k in shards for s in plan.shards[k]}
            self.slots.append(_Slot(i, shards, [s for s in plan.symbols if s in mine]))
        self.valid_until: float | None = None
        self.fenced: str | None = None
        self.failed: str | None = None
        self.stopping = False
        self._flush_s = 30.0  # what ``stop`` gives each child to flush
        self._kill_at: float | None = None
        self._started = time.monotonic()
        self._last_progress = (self._started, 0, 0)
        self._endpoint: WSGIServer | None = None

    # ---- starting ------------------------------------------------------------------------

    def start(self) -> None:
        self._serve()
        try:
            for slot in self.slots:
                if self.fenced is None:
                    self._spawn(slot, first=True)
        except BaseException:  # none left running behind a run that did not start
            self._kill_all("the run could not start all of its processes")
            self._close_endpoint()
            raise

    def wait_started(self, timeout_s: float = 60.0) -> bool:
        """Supervise until every child streams (has sent its first status line), one gave
        up, the run was fenced or ``timeout_s`` passed; True when all stream. A child's
        start (imports, producer) takes a second or more, several on a busy machine: the
        flow waits, so ``run_seconds`` counts streaming time, not process starts."""
        deadline = time.monotonic() + timeout_s
        while self.alive and time.monotonic() < deadline:
            if all(s.current and s.current.status for s in self.slots):
                self.logger.info(
                    "%d processes streaming after %.1f s: pids %s",
                    len(self.slots), time.monotonic() - self._started, self.pids(),
                )  # fmt: skip
                return True
            time.sleep(0.05)
        return False

    def _spawn(self, slot: _Slot, first: bool) -> None:
        share = max(
            len(slot.shards), self.max_in_flight * len(slot.shards) // len(self.plan.shards)
        )
        last = {s: t for s, t in self.last_trades.items() if s in slot.symbols} if first else None
        spec = ChildSpec(
            slot.index, slot.shards, self.plan, self.settings, self.run_id, self.topics,
            share, self.policy, last, self.valid_until, bool(self.metrics_port),
            self.status_every_s,
        )  # fmt: skip
        proc = subprocess.Popen(
            child_command(slot.index),
            cwd=config.PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        life = _Incarnation(proc, time.monotonic())
        with slot.lock:
            slot.lives.append(life)
            slot.restart_at = None
        for target in (self._feed, self._read, self._read_log):
            t = threading.Thread(
                target=target, args=(slot, life, spec), daemon=True,
                name=f"ingest-proc-{slot.index}-{target.__name__.strip('_')}",
            )  # fmt: skip
            t.start()
            life.threads.append(t)
        if not first:
            self.logger.warning(
                "%s started again as pid %d (restart %d)",
                slot.name(),
                proc.pid,
                len(slot.lives) - 1,
            )

    def _feed(self, slot: _Slot, life: _Incarnation, spec: ChildSpec) -> None:
        """Write the spec (blocking: it may exceed the pipe's buffer), then make the pipe
        non-blocking for commands and send what changed meanwhile."""
        assert life.proc.stdin is not None
        try:
            life.proc.stdin.write(base64.b64encode(pickle.dumps(spec)) + b"\n")
            life.proc.stdin.flush()
        except OSError:  # it died before reading: ``supervise`` sees its exit
            return
        os.set_blocking(life.proc.stdin.fileno(), False)
        with slot.lock:
            life.ready = True
        if self.fenced is not None:
            self._command(slot, life, {"fence": self.fenced})
        elif self.stopping:
            self._command(slot, life, {"stop": self._flush_s})
        elif self.valid_until != spec.valid_until and self.valid_until is not None:
            self._command(slot, life, {"extend": self.valid_until})

    def _read(self, slot: _Slot, life: _Incarnation, spec: ChildSpec) -> None:
        assert life.proc.stdout is not None
        for line in life.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "status" in msg:
                life.status = msg["status"]
            elif "report" in msg:
                life.report = msg["report"]
            elif "metrics_port" in msg:
                life.metrics_port = msg["metrics_port"]

    def _read_log(self, slot: _Slot, life: _Incarnation, spec: ChildSpec) -> None:
        """The child's log, into the parent's (the flow run's) with the child's name."""
        assert life.proc.stderr is not None
        level = logging.INFO
        for raw in life.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            life.stderr.append(line)
            word = line.split(" ", 3)[2] if line.count(" ") >= 3 else ""
            level = _LEVELS.get(word, level)
            self.logger.log(level, "process %d pid %d: %s", slot.index, life.proc.pid, line)

    def _command(self, slot: _Slot, life: _Incarnation, msg: dict[str, Any]) -> bool:
        """One command line to a child, never blocking; False if it was not written (not
        ready yet: it is sent once the spec is; gone; or its pipe full: frozen)."""
        line = (json.dumps(msg)[:3000] + "\n").encode()
        with slot.lock:
            if not life.ready or life.proc.stdin is None or life.proc.stdin.closed:
                return False
            try:
                os.write(life.proc.stdin.fileno(), line)
                return True
            except (BlockingIOError, BrokenPipeError, OSError):
                return False

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for slot in self.slots:
            life = slot.current
            if life is not None and life.proc.poll() is None:
                self._command(slot, life, msg)

    # ---- the lease -----------------------------------------------------------------------

    def extend(self, valid_until: float) -> None:
        """The lease was renewed: children may publish until ``valid_until``."""
        if self.fenced is not None:
            return
        self.valid_until = valid_until
        self._broadcast({"extend": valid_until})

    def fence_reason(self) -> str | None:
        if self.fenced is None and self.valid_until is not None and clock() >= self.valid_until:
            self.fence("fenced: the lease was not renewed in time")
        return self.fenced

    def fence(self, reason: str) -> str:
        """Every child stops publishing now (and is killed if it has not ended within
        ``FENCE_KILL_S``); no child is started again. Returns the reason in force."""
        if self.fenced is None:
            self.fenced = reason
            self._kill_at = time.monotonic() + FENCE_KILL_S
        self._broadcast({"fence": self.fenced})
        return self.fenced

    # ---- supervision ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Supervise once; True while the run goes on (no child gave up, not fenced)."""
        self.supervise()
        return self.failed is None and self.fence_reason() is None

    def supervise(self) -> None:
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_all("fenced")
        if self.stopping or self.failed is not None or self.fenced is not None:
            return
        for slot in self.slots:
            life = slot.current
            if life is None:
                continue
            status = life.proc.poll()
            if status is None:
                continue
            if life.exit is None:  # just noticed
                self._died(slot, life, status, now)
                if self.failed is not None or self.fenced is not None:
                    return
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot, first=False)

    def _died(self, slot: _Slot, life: _Incarnation, status: int, now: float) -> None:
        life.exit = status
        for t in life.threads[1:]:  # its last lines: the final report, the log's tail
            t.join(2)
        tail = " | ".join(list(life.stderr)[-3:]) or "no output"
        what = f"{slot.name()}, pid {life.proc.pid}: {describe_exit(status)}"
        if status == EXIT_FENCED:
            reason = (life.report or {}).get(
                "fenced"
            ) or "fenced: the lease was not renewed in time"
            self.fence(f"{reason} ({what})")
            return
        slot.deaths = [t for t in slot.deaths if now - t < self.window_s] + [now]
        if len(slot.deaths) > self.max_restarts:
            self.failed = (
                f"{what}; it died {len(slot.deaths)} times within {self.window_s:.0f} s "
                f"(at most {self.max_restarts} restarts): giving up. Last output: {tail}"
            )
            self.logger.error("%s", self.failed)
            return
        delay = 0.0 if len(slot.deaths) == 1 else 0.5 * 2 ** (len(slot.deaths) - 2)
        self.logger.error("%s; starting it again in %.1f s. Last output: %s", what, delay, tail)
        slot.restart_at = now + delay

    def _kill_all(self, why: str) -> None:
        for slot in self.slots:
            life = slot.current
            if life is not None and life.proc.poll() is None:
                self.logger.error("%s, pid %d: killed (%s)", slot.name(), life.proc.pid, why)
                life.proc.kill()
        self._kill_at = None

    # ---- metrics -------------------------------------------------------------------------

    def _serve(self) -> None:
        """Serve every process's metrics on ``metrics_port`` (0: none): the one scrape
        target of the run whatever its number of processes. A port already taken costs
        the run its endpoint, not its data."""
        if not self.metrics_port:
            return
        registry = CollectorRegistry()
        registry.register(_Gathered(self))
        try:
            self._endpoint = metrics.serve(self.metrics_port, self.settings.listen_host, registry)
        except OSError as e:
            self.logger.error(
                "metrics port %d unavailable (%s): this run serves no metrics",
                self.metrics_port, e,
            )  # fmt: skip

    def _close_endpoint(self) -> None:
        if self._endpoint is not None:
            self._endpoint.shutdown()
            self._endpoint.server_close()
            self._endpoint = None

    def gather(self) -> list[Metric]:
        """This process's families and every running child's, labelled ``process``
        (``supervisor`` or the child's index). Children are asked at once, each for at
        most ``GATHER_TIMEOUT_S``; one that does not answer is left out of this scrape,
        which never fails for it."""
        lives = [
            (str(s.index), life) for s in self.slots
            if (life := s.current) and life.metrics_port and life.proc.poll() is None
        ]  # fmt: skip
        with ThreadPoolExecutor(max(1, len(lives)), thread_name_prefix="gather") as pool:
            asked = {index: pool.submit(self._child_metrics, index, life) for index, life in lives}
        sources = {"supervisor": metrics.own(), **{i: page.result() for i, page in asked.items()}}
        return metrics.merge(sources, "process")

    def _child_metrics(self, index: str, life: _Incarnation) -> list[Metric]:
        """One child's families; none if it does not answer (logged once per process:
        a frozen child would otherwise log on every scrape)."""
        assert life.metrics_port is not None
        try:
            return metrics.fetch(life.metrics_port, GATHER_TIMEOUT_S)
        except Exception as e:  # refused, timed out, cut off mid-page, unparsable: one
            # child's page never fails the scrape of the others
            if not life.unanswered:
                life.unanswered = True
                self.logger.warning(
                    "process %s pid %d: its metrics (loopback port %d) did not answer (%s): "
                    "left out of the scrapes it fails (logged once for this process)",
                    index, life.proc.pid, life.metrics_port, e,
                )  # fmt: skip
            return []

    # ---- progress and stopping -----------------------------------------------------------

    def _total(self, key: str) -> int:
        return sum((life.counts or {}).get(key, 0) for slot in self.slots for life in slot.lives)

    def update_gauges(self) -> tuple[float, int]:
        """(max lag s, in-flight) over the children's last status lines; the gauges
        themselves are each child's (gathered into the run's endpoint)."""
        current = [s.current.status for s in self.slots if s.current and s.current.status]
        return (
            max((c["lag_s"] for c in current), default=0.0),
            sum(c["in_flight"] for c in current),
        )

    def progress(self) -> str:
        """One line for the log: the children's status lines summed."""
        now = time.monotonic()
        frames, acked = self._total("frames"), self._total("acked")
        t0, f0, a0 = self._last_progress
        self._last_progress = (now, frames, acked)
        dt = max(now - t0, 1e-9)
        lag_s, inflight = self.update_gauges()
        current = [s.current.status for s in self.slots if s.current and s.current.status]
        p99 = [c["p99_ms"] for c in current if c.get("p99_ms") is not None]
        latency = f", event->ack p99 {max(p99):.1f} ms (worst process)" if p99 else ""
        restarts = sum(len(s.lives) - 1 for s in self.slots)
        running = sum(1 for s in self.slots if s.current and s.current.proc.poll() is None)
        reconnects = sum(sum(c["reconnects"].values()) for c in current)
        return (
            f"{self.plan.config.name}: {running}/{len(self.slots)} processes "
            f"({restarts} restarts), {(frames - f0) / dt:.0f} frames/s in, "
            f"{(acked - a0) / dt:.0f} msg/s acked, lag {lag_s * 1000:.0f} ms{latency}, "
            f"reconnects {reconnects}, in-flight {inflight}/{self.max_in_flight}, "
            f"dlq {self._total('dead_letters')}, repaired {self._total('trades_repaired')}"
        )

    def stop(self, flush_timeout_s: float = 30.0, join_timeout_s: float = STOP_GRACE_S) -> dict:
        """Stop every child (flushing for up to ``flush_timeout_s`` unless fenced), wait
        for its report, kill what is left; returns the run's report."""
        self._flush_s = flush_timeout_s
        self.stopping = True
        msg = {"fence": self.fenced} if self.fenced else {"stop": flush_timeout_s}
        self._broadcast(msg)
        grace = FENCE_KILL_S if self.fenced else flush_timeout_s + join_timeout_s
        deadline = time.monotonic() + grace
        for slot in self.slots:
            life = slot.current
            if life is None:
                continue
            if life.proc.poll() is None:
                try:
                    life.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.logger.error(
                        "%s, pid %d: no report %.0f s after stop: killed",
                        slot.name(), life.proc.pid, grace,
                    )  # fmt: skip
                    life.proc.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):  # report it as running
                        life.proc.wait(10)
            if life.exit is None:
                life.exit = life.proc.returncode
            for t in life.threads:
                t.join(5)
            with slot.lock, contextlib.suppress(OSError):
                life.ready = False
                if life.proc.stdin is not None:
                    life.proc.stdin.close()
        self._close_endpoint()  # the port is free for the next run in this process
        return self.report()

    def report(self) -> dict[str, Any]:
        totals = {k: self._total(k) for k in _SUMMED}
        reconnects: Counter[str] = Counter()
        resyncs: Counter[str] = Counter()
        sections, shards, errors, producer_errors = [], [], [], []
        last_ids: dict[str, int] = {}
        unresolved: int | None = 0
        peak = 0
        for slot in self.slots:
            for life in slot.lives:
                c = life.counts or {}
                reconnects.update(c.get("reconnects", {}))
                resyncs.update(c.get("book_resyncs", {}))
            life = slot.current
            final = (life.report if life else None) or {}
            last = (life.counts if life else None) or {}
            shards += last.get("shards", [])
            last_ids.update(last.get("last_trade_ids", {}))
            errors += final.get("shard_errors", [])
            if final.get("producer_error"):
                producer_errors.append(f"process {slot.index}: {final['producer_error']}")
            if unresolved is not None and final.get("unresolved_at_exit") is not None:
                unresolved += final["unresolved_at_exit"]
            else:  # a child ended without its report (killed): unknown, Kafka knows
                unresolved = None
            peak += final.get("peak_in_flight") or 0
            sections.append(
                {
                    "index": slot.index,
                    "shards": list(slot.shards),
                    "symbols": slot.symbols,
                    "restarts": max(0, len(slot.lives) - 1),
                    "lives": [
                        {
                            "pid": lv.proc.pid,
                            "exit": lv.exit,
                            "ended": describe_exit(lv.exit),
                            "counts": "final report" if lv.report else "last status line",
                            "acked": (lv.counts or {}).get("acked", 0),
                        }
                        for lv in slot.lives
                    ],
                    "report": {k: v for k, v in final.items() if k != "shards"} or None,
                }
            )
        return {
            "run_id": self.run_id,
            "venue": self.plan.config.name,
            "symbols": list(self.plan.symbols),
            "channels": list(self.plan.channels),
            "seconds": round(time.monotonic() - self._started, 3),
            **totals,
            "reconnects": dict(reconnects),
            "book_resyncs": dict(resyncs),
            "unresolved_at_exit": unresolved,
            "peak_in_flight": peak,
            "max_in_flight": self.max_in_flight,
            "shard_errors": errors + ([self.failed] if self.failed else []),
            "producer_error": "; ".join(producer_errors) or None,
            "last_trade_ids": last_ids,
            "shards": sorted(shards, key=lambda s: int(s["shard"])),
            "processes": sections,
        }

    def pids(self) -> list[int]:
        """The children running now."""
        return [
            s.current.proc.pid for s in self.slots if s.current and s.current.proc.poll() is None
        ]


class _Gathered:
    """The parent endpoint's one collector: on each scrape, what ``Supervisor.gather``
    finds (never cached: a scrape sees the children as they are)."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        return self.supervisor.gather()


# ---- the child's side ----------------------------------------------------------------------


class _Child:
    """One child: its ``Ingestion``, the commands from the parent, its status lines."""

    def __init__(self, spec: ChildSpec, out: IO[str]):
        self.spec = spec
        self.out = out
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self._out_lock = threading.Lock()

    def send(self, **msg: Any) -> None:
        with self._out_lock:
            self.out.write(json.dumps(msg, default=str) + "\n")
            self.out.flush()

    def read_commands(self) -> None:
        for line in sys.stdin:
            with contextlib.suppress(ValueError):
                self.commands.put(json.loads(line))
        self.commands.put({"stop": None, "why": "the parent is gone (stdin closed)"})

    def status(self, ing: Ingestion) -> dict[str, Any]:
        lag_s, inflight = ing.update_gauges()
        p = ing.publisher.latency.percentiles(0.5, 0.99)
        ing.publisher.latency.reset()
        report = ing.report()
        return {
            **report,
            "lag_s": lag_s,
            "in_flight": inflight,
            "p50_ms": p[0] if p else None,
            "p99_ms": p[1] if p else None,
        }

    def run(self) -> int:
        spec = self.spec
        if spec.serve_metrics:  # before the first status line: the parent gathers from then
            try:
                self.send(metrics_port=metrics.serve_loopback())
            except OSError as e:  # no loopback port: publish anyway, without metrics
                log.error("no loopback port for this process's metrics (%s): serving none", e)
        threading.Thread(target=self.read_commands, name="commands", daemon=True).start()
        last = spec.last_trades
        if last is None and spec.plan.repairs_gaps:
            symbols = [s for i in spec.shards for s in spec.plan.shards[i]]
            t0 = time.monotonic()
            last = resume.last_trades(
                spec.settings, spec.topics.trades, spec.plan.config.name, symbols
            )
            log.info(
                "restarted: resuming from trade ids %s (read back from Kafka in %.1f s)",
                {s: t.trade_id for s, t in last.items()}, time.monotonic() - t0,
            )  # fmt: skip
        ing = Ingestion(
            spec.plan, spec.settings, run_id=spec.run_id, topics=spec.topics,
            max_in_flight=spec.max_in_flight, policy=spec.policy, last_trades=last,
            shards=spec.shards,
        )  # fmt: skip
        ing.publisher.valid_until = spec.valid_until
        flush_s: float | None = 30.0
        asked = False
        started = False
        next_status = time.monotonic()
        while True:
            try:
                cmd = self.commands.get(timeout=0.05)
            except queue.Empty:
                cmd = None
            if cmd is not None:
                if "extend" in cmd:
                    ing.extend(cmd["extend"])
                elif "fence" in cmd:
                    ing.fence(cmd["fence"])
                    asked = True
                    break
                elif "stop" in cmd:
                    flush_s = 30.0 if cmd["stop"] is None else cmd["stop"]
                    asked = True
                    if "why" in cmd:
                        log.warning("stopping: %s", cmd["why"])
                    break
                continue  # take every queued command before anything else
            if not started:  # after the commands queued while it was being built
                freeze_heap()
                ing.start()
                started = True
            if not ing.alive:
                break
            now = time.monotonic()
            if now >= next_status:
                self.send(status=self.status(ing))
                next_status = now + spec.status_every_s
        fenced = ing.fence_reason()
        if fenced is not None:
            ing.fence(fenced)
        until = ing.publisher.valid_until
        if until is not None:  # flush only while the fence point allows sending
            flush_s = min(flush_s or 0.0, max(0.0, until - clock()))
        report = ing.stop(flush_timeout_s=flush_s or 0.0)
        report["fenced"] = fenced
        self.send(report=report)
        if fenced is not None:
            return EXIT_FENCED
        if not asked or report["shard_errors"] or report["producer_error"]:
            log.error(
                "stopped by itself: shards %s, producer %s",
                report["shard_errors"], report["producer_error"],
            )  # fmt: skip
            return EXIT_FAILED
        return 0


def child_main() -> int:
    """``python -m tasks.ingest.processes``: one child, its spec on the first stdin line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent decides
    out = os.fdopen(os.dup(1), "w")  # the protocol's own stream ...
    os.dup2(2, 1)  # ... and anything printed goes to the log instead
    sys.stdout = sys.stderr
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the parent went away before it wrote the spec
    spec: ChildSpec = pickle.loads(base64.b64decode(line))
    logging.basicConfig(  # libraries' warnings, our own info (as a flow run logs them)
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tasks").setLevel(logging.INFO)
    child = _Child(spec, out)
    signal.signal(signal.SIGTERM, lambda *_: child.commands.put({"stop": None, "why": "SIGTERM"}))
    return child.run()


if __name__ == "__main__":
    sys.exit(child_main())
