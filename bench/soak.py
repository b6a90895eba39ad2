"""Soak benchmark with faults: the whole platform for N minutes under load, faults on a
timeline, then the numbers and a PASS/FAIL line per target.

    .venv/bin/python -m bench.soak --minutes 10                      # the full soak
    .venv/bin/python -m bench.soak --minutes 3 --faults worker,postgres   # development

It runs the platform the way the main command does (``deployments.platform``: stack, work
pool, blocks, deployments, the side processes of ``deployments.local``, the ingestion and
trading-activity deployments, the scheduled drains and aggregation), with the exchange
simulator at ``--rate`` trades/s in total (plus its quotes), and injects, each at a fixed
offset (printed when it happens):

- ``poison``: records nobody planned for, produced straight into the topics the drains read
  (a 3,000-character symbol, a 17,000-digit price, a value over 900 KB, an empty value,
  invalid UTF-8, a unicode symbol, a negative price, a transaction whose amounts overflow);
- ``worker-pending``: the Prefect worker SIGKILLed while a drain run is Pending (being
  submitted), then started again as the platform starts it (``deployments.local``);
- ``postgres``: PostgreSQL stopped and started (``stack.services``);
- ``kafka``: the broker's process group SIGSTOPped for 20 s, then SIGCONTed;
- ``prefect``: the Prefect server stopped for 2 minutes, then started (``stack.services``);
  if the stack's pid file has lost track of the server, it is paused (SIGSTOP/SIGCONT)
  instead, and the output says so;
- ``worker-running``: the worker SIGKILLed while a drain run is Running (mid-batch), restarted
  (last: the killed run holds its deployment's one-at-a-time slot for minutes).
``--faults worker`` means both worker faults; ``--faults none`` runs the load alone. Each
fault starts at its planned offset (at least ``--min-gap`` after the previous one ended) and
the load goes on ``--settle`` seconds after the last one, so a short run lasts longer.

What a worker kill takes with it (``--worker-kill``): ``drain`` (default) the worker's
process group plus every flow-run process it started except the long ingestion and trading
runs (so the drain being submitted or mid-batch dies with it); ``worker`` the worker's
process group only (Prefect starts each flow-run process in a session of its own, so they
survive as orphans); ``tree`` the worker and everything it started (a lost host).

Measurements (how each is taken is printed with the results):

- freshness: every second the newest stored trade id per symbol is read; of the trade ids
  that became visible since the previous poll, one in ``--sample-every`` is read back with
  its ``event_us``: freshness = poll time - event time (an upper bound, by at most the
  poll interval). Also the age of the newest stored trade (now - max(event_us)).
- start-up window: from the load's start until the newest stored trade is first under
  ``--fresh-s`` old (catching up with what came before; printed); measurements count from
  the load's start.
- fault window: from the fault's start until it has recovered; recovery = from the fault's
  end (process restarted, broker resumed, poison acknowledged) until a poll sees trades
  stored after that end and the newest stored trade less than ``--fresh-s`` old.
- consumer lag: every 2 s, log end offsets minus the offsets the drains stored with their
  data (PostgreSQL/MongoDB ``kafka_offsets``), per drain.
- drain idle with lag: from the offsets stored with the data, polled every 2 s: the
  stretches in which records waited and the stored offsets did not move; and the
  scheduled runs Cancelled, Crashed, Failed, stuck Pending (> 30 s) or never started.
- end state (after the run stops, the long runs are cancelled and every drain ran once
  more): each trade id once, no holes per symbol (``tasks.telemetry.verify``), every quote
  received stored, wallets equal to the fold of the stored transactions, and the drains'
  DLQ records since the start equal to the poison records the codec refuses.

A benchmark never aborts because the machine is slow: it prints what it measured and exits
0 unless it could not run at all (2).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import contextvars
import json
import math
import os
import random
import re
import signal
import string
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pymongo
from kafka import TopicPartition

from deployments import local, reaper
from deployments import platform as plat
from deployments import setup as deployment_setup
from stack.process import alive, read_pid
from stack.services import services, up
from tasks import venues
from tasks.core import codec, config, dlq
from tasks.core.events import Quote, UserTransaction
from tasks.core.kafka import consumer, producer
from tasks.core.topics import DLQ, QUOTES, TRADES, USER_TRANSACTIONS, ensure_topics
from tasks.core.wallets import effects, fold_transactions, wallet_balances
from tasks.ingest.resume import last_trades
from tasks.telemetry import verify

# The order of the timeline. The mid-batch worker kill goes last: a drain run killed while
# Running holds its deployment's one-at-a-time slot until Prefect gives it up (minutes), and
# the faults after it would only measure that.
FAULT_ORDER = ("poison", "worker-pending", "postgres", "kafka", "prefect", "worker-running")
# Roughly how long each fault lasts once started (to place the next one after it).
FAULT_SECONDS = {
    "poison": 1,
    "worker-pending": 15,
    "postgres": 5,
    "kafka": 20,
    "prefect": 120,
    "worker-running": 15,
}
ALIASES = {"worker": ("worker-pending", "worker-running"), "all": FAULT_ORDER, "none": ()}
SIDE_NAMES = ("simulator", "pushgateway", "exporter", "worker")
SIDE_PORTS = {"simulator": 18765, "pushgateway": 9091, "exporter": 9110, "worker": 8080}
VENUE = venues.simulated("binance")  # what the simulator feed's trades are stored as
POISON_VENUE = "soak-poison"
CONSUMERS = {
    "drain-prices/continuous": ("tapeline-drain-prices", (TRADES, QUOTES)),
    "drain-transactions/continuous": ("tapeline-drain-transactions", (USER_TRANSACTIONS,)),
}
DRAIN_SOURCES = {
    TRADES: "drain.prices",
    QUOTES: "drain.prices",
    USER_TRANSACTIONS: "drain.transactions",
}
PENDING_STUCK_S = 30.0
ARTIFACT = re.compile(
    r"(?P<stopped>[^:]+): (?P<stopped2>.+?) after (?P<seconds>[\d.]+) s, (?P<batches>\d+) batches"
    r" \(first after (?P<first>\S+) s, longest wait (?P<wait>[\d.]+) s\)"
)


# ----------------------------------------------------------------------------- printing
class Clock:
    def __init__(self) -> None:
        self.t0 = time.time()

    def off(self, t: float | None = None) -> float:
        return (time.time() if t is None else t) - self.t0

    def stamp(self, t: float | None = None) -> str:
        s = self.off(t)
        sign = "-" if s < 0 else "+"
        s = abs(s)
        return f"{sign}{int(s // 60):02d}:{int(s % 60):02d}"


CLOCK = Clock()
_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(f"[{CLOCK.stamp()}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def fmt_s(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f} s"


# ----------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    st = _proc_stat(pid)
    return int(st[19]) if st else None


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        st = _proc_stat(int(stat.parent.name))
        if st:
            children[int(st[1])].append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


def sigkill_tree(pids: list[int]) -> list[int]:
    """SIGKILL each pid and, where it leads its own process group, that group."""
    killed = []
    for pid in pids:
        st = _proc_stat(pid)
        if st is None:
            continue
        try:
            if int(st[2]) == pid:  # pgrp: a group leader (Prefect isolates flow-run sessions)
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in killed):
        time.sleep(0.1)
    return killed


@dataclass
class Owned:
    """Processes this soak started (side processes, and flow-run processes its workers
    started): the only ones it may end."""

    procs: dict[int, tuple[int | None, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, pid: int, what: str) -> None:
        with self.lock:
            if pid not in self.procs:
                self.procs[pid] = (start_ticks(pid), what)

    def still_mine(self, pid: int) -> bool:
        with self.lock:
            rec = self.procs.get(pid)
        return rec is not None and alive(pid) and start_ticks(pid) == rec[0]


# ----------------------------------------------------------------------------- probes
class Probe(threading.Thread):
    """A daemon loop that never dies of an exception: it records and carries on."""

    every = 1.0

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.stop_event = threading.Event()
        self.errors: Counter[str] = Counter()
        self._ctx = contextvars.copy_context()

    def run(self) -> None:
        self._ctx.run(self._loop)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            t = time.monotonic()
            try:
                self.tick()
            except Exception as e:  # a probe that fails is a gap in the series, not an end
                self.errors[type(e).__name__] += 1
                self.on_error(e)
            self.stop_event.wait(max(0.0, self.every - (time.monotonic() - t)))

    def tick(self) -> None:
        raise NotImplementedError

    def on_error(self, e: Exception) -> None:
        pass

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)


class StoreProbe(Probe):
    """Freshness as PostgreSQL shows it, polled every second."""

    every = 1.0

    def __init__(
        self, settings: config.Settings, symbols: list[str], since_us: int, sample_every: int
    ):
        super().__init__("store-probe")
        self.settings, self.symbols, self.since_us = settings, symbols, since_us
        self.sample_every = sample_every
        self.conn: Any = None
        self.last_id: dict[str, int | None] = {}
        self.base_id: dict[str, int] = {}
        # (poll time, newest stored trade age over all symbols (worst), stored since start)
        self.ticks: list[tuple[float, float | None, int]] = []
        self.samples: list[tuple[float, float, float]] = []  # (appeared, event time, freshness)
        self.live: set[str] = set()  # symbols with trades stored since the start
        self.ready = threading.Event()

    def _connect(self):
        if self.conn is None:
            self.conn = psycopg2.connect(self.settings.pg_dsn, connect_timeout=2)
            self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute("SET statement_timeout = 5000")
        return self.conn

    def on_error(self, e: Exception) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def tick(self) -> None:
        t_poll = time.time()
        conn = self._connect()
        newest: dict[str, tuple[int, int]] = {}
        with conn.cursor() as cur:
            try:
                for sym in self.symbols:
                    cur.execute(
                        "SELECT trade_id, event_us FROM trades WHERE venue = %s AND symbol = %s"
                        " ORDER BY trade_id DESC LIMIT 1",
                        (VENUE, sym),
                    )
                    row = cur.fetchone()
                    if row:
                        newest[sym] = (row[0], row[1])
            except psycopg2.errors.UndefinedTable:
                newest = {}
            if not self.ready.is_set():  # the first poll sets where "since the start" begins
                for sym in self.symbols:
                    self.last_id[sym] = newest[sym][0] if sym in newest else None
                    self.base_id[sym] = newest[sym][0] if sym in newest else 0
                self.ready.set()
                return
            for sym, (top, _) in newest.items():
                last = self.last_id.get(sym)
                if last is None:
                    last = -1
                    self.base_id.setdefault(sym, 0)
                if top > last:
                    cur.execute(
                        "SELECT event_us FROM trades WHERE venue = %s AND symbol = %s"
                        " AND trade_id > %s AND trade_id <= %s AND trade_id %% %s = 0"
                        " AND event_us >= %s",
                        (VENUE, sym, last, top, self.sample_every, self.since_us),
                    )
                    for (event_us,) in cur.fetchall():
                        ev = event_us / 1e6
                        self.samples.append((t_poll, ev, t_poll - ev))
                    self.last_id[sym] = top
        for sym, (top, _) in newest.items():
            if top > self.base_id.get(sym, 0):
                self.live.add(sym)
        # the age of the newest stored trade, worst of the symbols stored since the start (a
        # symbol never stored since is reported by the end-state check, not as "stale")
        ages = [t_poll - ev / 1e6 for sym, (_, ev) in newest.items() if sym in self.live]
        stored = sum(top - self.base_id.get(sym, 0) for sym, (top, _) in newest.items())
        self.ticks.append((t_poll, max(ages) if ages else None, stored))

    def latest(self) -> tuple[float, float | None, int] | None:
        return self.ticks[-1] if self.ticks else None


class Reaper(Probe):
    """The platform command's backstop for orphaned scheduled runs (``reaper.reap``), on
    its schedule; what it ends is printed and listed with the events."""

    every = reaper.REAP_EVERY_S

    def __init__(self, events: list[str]):
        super().__init__("reaper")
        self.events = events

    def tick(self) -> None:
        for line in reaper.reap(local_pids=True):
            say(line)
            self.events.append(line)


class KafkaProbe(Probe):
    """Offered load (log end offsets) and each drain's lag against its stored offsets."""

    every = 2.0

    def __init__(self, settings: config.Settings):
        super().__init__("kafka-probe")
        self.settings = settings
        self.c: Any = None
        self.mongo: Any = None
        self.parts: dict[str, list[TopicPartition]] = {}
        self.starts: dict[TopicPartition, int] = {}
        self.ends: list[tuple[float, dict[str, int]]] = []  # (time, topic -> sum of ends)
        self.lag: list[tuple[float, dict[str, int]]] = []  # (time, deployment -> lag)
        # (time, deployment -> sum of the offsets stored with the data): idle = no change
        self.stored: list[tuple[float, dict[str, int]]] = []

    def on_error(self, e: Exception) -> None:
        if isinstance(e, (psycopg2.Error, pymongo.errors.PyMongoError)):
            return
        if self.c is not None:
            with contextlib.suppress(Exception):
                self.c.close()
            self.c = None

    def tick(self) -> None:
        if self.c is None:
            self.c = consumer(None, self.settings, request_timeout_ms=8000)
            for topic in (TRADES, QUOTES, USER_TRANSACTIONS):
                self.parts[topic] = [
                    TopicPartition(topic, p)
                    for p in sorted(self.c.partitions_for_topic(topic) or ())
                ]
            every_tp = [tp for tps in self.parts.values() for tp in tps]
            self.starts = self.c.beginning_offsets(every_tp)
        every_tp = [tp for tps in self.parts.values() for tp in tps]
        t = time.time()
        ends = self.c.end_offsets(every_tp)
        self.ends.append(
            (t, {topic: sum(ends[tp] for tp in tps) for topic, tps in self.parts.items()})
        )
        stored: dict[tuple[str, int], int] = {}
        lag: dict[str, int] = {}
        done: dict[str, int] = {}
        try:
            with (
                psycopg2.connect(self.settings.pg_dsn, connect_timeout=2) as conn,
                conn.cursor() as cur,
            ):
                cur.execute(
                    "SELECT topic, partition, next_offset FROM kafka_offsets WHERE consumer = %s",
                    (CONSUMERS["drain-prices/continuous"][0],),
                )
                stored.update({(tp, p): o for tp, p, o in cur.fetchall()})
            conn.close()
            lag["drain-prices/continuous"] = self._lag(ends, stored, (TRADES, QUOTES))
            done["drain-prices/continuous"] = self._done(stored, (TRADES, QUOTES))
        except psycopg2.errors.UndefinedTable:
            lag["drain-prices/continuous"] = self._lag(ends, {}, (TRADES, QUOTES))
        except psycopg2.Error:
            pass
        try:
            if self.mongo is None:
                self.mongo = pymongo.MongoClient(
                    self.settings.mongo_url, serverSelectionTimeoutMS=3000
                )
            docs = self.mongo[self.settings.mongo_db].kafka_offsets.find(
                {"consumer": CONSUMERS["drain-transactions/continuous"][0]}
            )
            mstored = {(d["topic"], d["partition"]): d["next"] for d in docs}
            lag["drain-transactions/continuous"] = self._lag(ends, mstored, (USER_TRANSACTIONS,))
            done["drain-transactions/continuous"] = self._done(mstored, (USER_TRANSACTIONS,))
        except pymongo.errors.PyMongoError:
            pass
        self.lag.append((t, lag))
        self.stored.append((t, done))

    def _done(self, stored, topics) -> int:
        return sum(
            stored.get((tp.topic, tp.partition), self.starts.get(tp, 0))
            for topic in topics
            for tp in self.parts[topic]
        )

    def _lag(self, ends, stored, topics) -> int:
        total = 0
        for topic in topics:
            for tp in self.parts[topic]:
                at = stored.get((tp.topic, tp.partition), self.starts.get(tp, 0))
                total += max(0, ends[tp] - at)
        return total

    def rate(self, topic: str, window_s: float = 30.0) -> float | None:
        if len(self.ends) < 2:
            return None
        t1, e1 = self.ends[-1]
        t0, e0 = next(
            ((t, e) for t, e in reversed(self.ends[:-1]) if t1 - t >= window_s), self.ends[0]
        )
        return (e1[topic] - e0[topic]) / (t1 - t0) if t1 > t0 else None


class RunProbe(Probe):
    """Flow runs of the platform's deployments (state changes printed when notable) and the
    flow-run processes of this soak's worker (recorded as this soak's own)."""

    every = 5.0

    def __init__(self, soak: Soak):
        super().__init__("run-probe")
        self.soak = soak
        self.states: dict[Any, tuple[str, str, str]] = {}  # run id -> (deployment, run, state)
        self.runs: dict[Any, Any] = {}
        self.client_cm: Any = None
        self.client: Any = None

    def on_error(self, e: Exception) -> None:
        self.client = None

    def tick(self) -> None:
        soak = self.soak
        wpid = soak.side_pid("worker")
        if wpid is not None:
            for pid in descendants(wpid):
                soak.owned.add(pid, f"flow-run process of worker {wpid}: {cmdline(pid)}")
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            FlowRunFilter,
            FlowRunFilterExpectedStartTime,
        )

        if self.client is None:
            self.client = get_client(sync_client=True)
            self.client.__enter__()
        from datetime import UTC, datetime

        runs = self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": list(soak.deployment_ids.values())}),
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(
                    after_=datetime.fromtimestamp(CLOCK.t0 - 120, UTC),
                    before_=datetime.fromtimestamp(time.time() + 30, UTC),
                )
            ),
            limit=200,
        )
        names = {v: k for k, v in soak.deployment_ids.items()}
        for r in runs:
            self.runs[r.id] = r
            dep = names.get(r.deployment_id, "?")
            state = r.state.name if r.state else "?"
            before = self.states.get(r.id)
            self.states[r.id] = (dep, r.name, state)
            if before is None or before[2] != state:
                routine = state in ("Scheduled", "Pending", "Submitting", "Running", "Completed")
                if not routine or dep in (plat.INGEST["simulator"], plat.TRADING):
                    msg = f" ({r.state.message[:160]})" if r.state and r.state.message else ""
                    say(f"run {dep} {r.name}: {before[2] if before else '-'} -> {state}{msg}")


# ----------------------------------------------------------------------------- poison
@dataclass
class Poison:
    name: str
    topic: str
    key: bytes
    value: bytes
    refused_by: str = ""  # the codec's (or wallet rule's) reason; empty: valid, to be stored
    partition: int = -1
    offset: int = -1
    acked_at: float = 0.0


def poison_set(now_us: int) -> list[Poison]:
    rng = random.Random()
    tag = uuid.uuid4().hex[:8]

    def trade(**over: Any) -> dict[str, Any]:
        d = {
            "v": 1, "t": "trade", "venue": POISON_VENUE, "symbol": "SOAK-USDT",
            "venue_symbol": "SOAKUSDT", "trade_id": rng.randrange(1, 10**9), "price": "1.5",
            "qty": "2", "side": "buy", "event_us": now_us, "recv_us": now_us,
        }  # fmt: skip
        d.update(over)
        return d

    def enc(d: dict[str, Any]) -> bytes:
        return json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode()

    long_symbol = "".join(rng.choices(string.ascii_letters + string.digits, k=3000))
    huge_price = "1." + "".join(rng.choices(string.digits, k=16998)) + "1"  # 17,000 digits
    big = trade(venue_symbol="X" * (900 * 1024 + 512))
    bad_utf8 = enc(trade(symbol="@@@@-USDT")).replace(b"@@@@", b"\xff\xfe\xc3\x28")
    tx = {
        "v": 1, "t": "tx", "tx_id": f"soak-poison-{tag}", "user_id": f"soak-poison-{tag}",
        "symbol": "BTC-USDT", "side": "buy", "qty": "9" * 30, "price": "9" * 30, "fee": "0",
        "status": "filled", "event_us": now_us,
    }  # fmt: skip
    key = POISON_VENUE.encode()
    items = [
        Poison("3000-char symbol", TRADES, key, enc(trade(symbol=long_symbol))),
        Poison("17000-digit price", TRADES, key, enc(trade(price=huge_price))),
        Poison("value over 900 KB", TRADES, key, enc(big)),
        Poison("empty value", TRADES, key, b""),
        Poison("invalid UTF-8", TRADES, key, bad_utf8),
        Poison(
            "unicode symbol",
            TRADES,
            key,
            enc(trade(symbol="ЗОЛОТО🚀-USDT", venue_symbol="ЗОЛОТО🚀USDT")),
        ),
        Poison("negative price", TRADES, key, enc(trade(price="-42.5"))),
        Poison("overflowing transaction", USER_TRANSACTIONS, tx["user_id"].encode(), enc(tx)),
    ]
    for p in items:  # what the platform's own rules say should happen to each
        try:
            ev = codec.decode(p.value)
            if isinstance(ev, UserTransaction):
                effects(ev)
        except codec.CodecError as e:
            p.refused_by = e.reason
    return items


# ----------------------------------------------------------------------------- faults
@dataclass
class Fault:
    name: str
    planned: float  # offset from the start
    started: float | None = None
    ended: float | None = None  # when the fault was removed (restart done, broker resumed)
    recovered: float | None = None  # trades moving again and the newest stored < fresh_s old
    moving: float | None = None  # first poll after the end that saw new trades stored
    baseline: float | None = None  # newest stored age back to what it was before the fault
    baseline_s: float | None = None  # that level: the worst age in the 120 s before the fault
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    target_run: Any = None  # worker faults: the drain run that was Pending/Running

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        say(f"  {self.name}: {msg}")


def plan(
    selected: list[str], seconds: float, lead_s: float, settle_s: float, durations: dict[str, float]
) -> list[Fault]:
    """Place the selected faults one after another from ``lead_s``: each starts a gap after
    the previous one is expected to end, the gaps filling the run up to ``settle_s`` before
    its end, but never shorter than a schedule period (60 s), so that each fault meets a
    drain run of its own (a short run then lasts longer than asked)."""
    if not selected:
        return []
    busy = sum(durations[f] for f in selected)
    gap = max(60.0, (seconds - lead_s - settle_s - busy) / max(1, len(selected) - 1))
    out, t = [], lead_s
    for name in selected:
        out.append(Fault(name, t))
        t += durations[name] + gap
    return out


# ----------------------------------------------------------------------------- the soak
class Soak:
    def __init__(self, args: argparse.Namespace, settings: config.Settings):
        self.args, self.settings = args, settings
        self.symbols = list(plat.SYMBOLS)
        self.owned = Owned()
        self.sides: list[local.Side] = []
        self.side_pids: dict[str, int] = {}
        self.deployment_ids: dict[str, Any] = {}
        self.long_runs: list[Any] = []  # ingestion and trading run ids this soak started
        self.restore: dict[str, Callable[[], None]] = {}  # what must be undone on any exit
        self.faults: list[Fault] = []
        self.poison: list[Poison] = []
        self.dlq_start: dict[int, int] = {}
        self.since_us = 0
        self.t_load_end: float | None = None
        self.events: list[str] = []
        self.generated: list[tuple[float, int | None]] = []  # (time, simulator trades generated)
        self.final: dict[str, Any] = {}
        self.store: StoreProbe | None = None
        self.kafka: KafkaProbe | None = None
        self.runs: RunProbe | None = None
        self.reaper: Reaper | None = None

    # -- side processes ---------------------------------------------------------------
    def side(self, name: str) -> local.Side | None:
        return next((s for s in self.sides if s.name == name), None)

    def side_pid(self, name: str) -> int | None:
        pid = self.side_pids.get(name)
        return pid if pid is not None and self.owned.still_mine(pid) else None

    def start_side(self, s: local.Side) -> str:
        how = s.up(self.settings.home)
        pid = read_pid(s.paths(self.settings.home)[1])
        if pid is not None and how == "started":
            self.side_pids[s.name] = pid
            self.owned.add(pid, f"side process {s.name}")
        return how

    def stop_side(self, s: local.Side) -> None:
        """Stop a side process only while its pid file still names the one this soak started."""
        pid = self.side_pids.get(s.name)
        if (
            pid is not None
            and read_pid(s.paths(self.settings.home)[1]) == pid
            and self.owned.still_mine(pid)
        ):
            s.down(self.settings.home)

    def wait_for_free_sides(self) -> bool:
        """Someone else's platform (or test) holds the fixed ports: wait, never kill."""
        deadline = time.monotonic() + self.args.wait_minutes * 60
        home = self.settings.home
        while True:
            busy = []
            for name in SIDE_NAMES:
                pid = read_pid(home / "run" / f"{name}.pid")
                if pid is not None:
                    busy.append(f"{name} (pid {pid})")
                elif _port_open(SIDE_PORTS[name]):
                    busy.append(f"{name} port {SIDE_PORTS[name]}")
            if not busy:
                return True
            if time.monotonic() > deadline:
                say(
                    f"side processes still running after {self.args.wait_minutes} min:"
                    f" {', '.join(busy)}"
                )
                return False
            say(f"waiting: another run holds {', '.join(busy)} (retrying in 15 s)")
            time.sleep(15)

    # -- set up -----------------------------------------------------------------------
    def foreign_stack(self) -> list[str]:
        """Services on the stack's ports that belong to another checkout (e.g. a CI run
        from a copy of the repository with its own TAPELINE_HOME)."""
        ours = (str(self.settings.home), str(Path(sys.executable).parent))
        out = []
        for svc in services(self.settings):
            lp = listener_pid(_svc_port(svc))
            if lp is None:
                continue
            cmd = cmdline(lp)
            if lp == 1 or not cmd or cmd == "?":
                continue
            if not any(o in cmd for o in ours) and read_pid(svc.pidfile) != lp:
                out.append(f"{svc.name} :{_svc_port(svc)} pid {lp} [{cmd[:100]}]")
        return out

    def ensure_stack(self) -> dict[str, str]:
        """``stack up`` for the services nothing listens for; a service whose port is taken
        is waited on, never launched again (a second Prefect server on a busy machine only
        fails to bind and overwrites the pid file of the one that runs). When another
        checkout's stack holds the ports, wait for it to go (``--wait-minutes``)."""
        deadline = time.time() + self.args.wait_minutes * 60
        while (foreign := self.foreign_stack()) and time.time() < deadline:
            say("waiting: another checkout's stack holds the ports: " + "; ".join(foreign))
            time.sleep(60)
        if foreign:
            raise RuntimeError(
                "another checkout's stack still holds the ports: " + "; ".join(foreign)
            )
        out, todo = {}, []
        for svc in services(self.settings):
            if not _port_open(_svc_port(svc)):
                todo.append(svc)
                continue
            if read_pid(svc.pidfile) is None:
                lp = listener_pid(_svc_port(svc))
                msg = (
                    f"{svc.name}: {svc.pidfile} names no live process; :{_svc_port(svc)} is"
                    f" served by pid {lp} [{cmdline(lp)[:120] if lp else '?'}]: faults on"
                    f" {svc.name} will not stop it"
                )
                say(msg)
                self.events.append(msg)
            deadline = time.time() + 120
            while not svc.answers() and time.time() < deadline:
                time.sleep(2)
            out[svc.name] = "running" if svc.answers() else "listening but not answering"
        if todo:
            out.update(up(todo))
        return out

    def setup(self) -> bool:
        s = self.settings
        say(f"stack: {self.ensure_stack()}")
        ensure_topics(s)
        if not self.wait_for_free_sides():
            return False

        def register() -> int:
            if deployment_setup.main([]) != 0:
                raise RuntimeError("python -m deployments.setup failed (see above)")
            return 0

        self._patiently("registering deployments", register)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for name in (*CONSUMERS, reaper.AGGREGATE, plat.INGEST["simulator"], plat.TRADING):
                self.deployment_ids[name] = client.read_deployment_by_name(name).id
            self.report_open_runs(client)
        self.dlq_start = self._dlq_ends()
        self.since_us = time.time_ns() // 1000
        last = last_trades(s, TRADES, VENUE, self.symbols)
        self.sides = local.sides(
            s, self.symbols, simulate=True, start_ids={k: t.trade_id + 1 for k, t in last.items()}
        )
        if not self.wait_for_free_sides():  # checked again: the set-up took a while
            return False
        for side in self.sides:
            say(f"{side.name:12} {self.start_side(side)}")
        say("Tapeline is running:\n" + plat.where(s))
        ingest = self._patiently(
            "starting ingestion",
            lambda: reaper.run_deployment(plat.INGEST["simulator"], symbols=self.symbols),
        )
        trading = self._patiently(
            "starting trading activity", lambda: reaper.run_deployment(plat.TRADING)
        )
        self._patiently("starting the drains", plat.start_drains)
        self.long_runs = [ingest.id, trading.id]
        say(f"started ingestion run {ingest.name} and trading run {trading.name}")
        self.store = StoreProbe(s, self.symbols, self.since_us, self.args.sample_every)
        self.kafka = KafkaProbe(s)
        self.runs = RunProbe(self)
        self.reaper = Reaper(self.events)
        for p in (self.store, self.kafka, self.runs, self.reaper):
            p.start()
        self.store.ready.wait(30)
        self._await_ingestion()
        return True

    def _await_ingestion(self) -> None:
        """The load starts when trades reach Kafka: a worker on a busy machine can take
        minutes to start the ingestion run, and a fault before that measures nothing."""
        t0, first = time.time(), self._trades_end()
        while time.time() - t0 < self.args.ready_minutes * 60:
            time.sleep(5)
            now = self._trades_end()
            if first is not None and now is not None and now > first:
                say(f"trades reach Kafka {time.time() - t0:.0f} s after ingestion was started")
                return
            first = first if first is not None else now
        msg = f"no trade reached Kafka within {self.args.ready_minutes:g} min; the soak goes on"
        say(msg)
        self.events.append(msg)

    def _patiently(self, what: str, fn: Callable[[], Any]) -> Any:
        """A busy Prefect server answers 500/503 for a while: retry for ``--setup-minutes``."""
        deadline = time.time() + self.args.setup_minutes * 60
        while True:
            try:
                return fn()
            except Exception as e:
                if time.time() > deadline:
                    raise
                say(f"{what}: {type(e).__name__}: {str(e)[:120]}; retrying in 10 s")
                time.sleep(10)

    def report_open_runs(self, client: Any) -> None:
        """Runs of the platform's deployments left open by earlier runs (a Pending or
        Running one may hold its deployment's one-at-a-time slot): printed as found."""
        from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter

        names = {v: k for k, v in self.deployment_ids.items()}
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": list(self.deployment_ids.values())}),
            flow_run_filter=FlowRunFilter(
                state={"type": {"any_": ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]}}
            ),
            limit=200,
        )
        runs += [
            r
            for r in client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id={
                        "any_": [
                            self.deployment_ids[plat.INGEST["simulator"]],
                            self.deployment_ids[plat.TRADING],
                        ]
                    }
                ),
                flow_run_filter=FlowRunFilter(state={"type": {"any_": ["SCHEDULED"]}}),
                limit=50,
            )
            if r.expected_start_time is None or r.expected_start_time.timestamp() < time.time() + 60
        ]  # a due ingestion run the next worker starts beside this soak's own
        for r in runs:
            since = r.state.timestamp.strftime("%H:%M:%S") if r.state else "?"
            state = r.state.name if r.state else "?"
            dep = names.get(r.deployment_id)
            msg = f"open before the start: {dep} {r.name} {state} since {since}"
            say(msg)
            self.events.append(msg)

    def _dlq_ends(self) -> dict[int, int]:
        c = consumer(None, self.settings)
        try:
            tps = [TopicPartition(DLQ, p) for p in sorted(c.partitions_for_topic(DLQ) or ())]
            return {tp.partition: o for tp, o in c.end_offsets(tps).items()}
        finally:
            c.close()

    # -- the timeline -----------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        seconds = args.minutes * 60
        durations = {**FAULT_SECONDS, "prefect": args.prefect_down, "kafka": args.kafka_down}
        self.faults = plan(args.fault_list, seconds, args.lead, args.settle, durations)
        self.t_setup = time.time() - CLOCK.t0
        self.t_start = CLOCK.t0 = time.time()  # printed offsets count from the load's start
        self.generated = [(time.time(), self.sim_generated())]
        say(f"load started (set-up took {self.t_setup:.0f} s); offsets from here on")
        say(
            "fault plan (offsets from the load's start): "
            + (", ".join(f"+{_mmss(f.planned)} {f.name}" for f in self.faults) or "none")
        )
        next_summary = time.time() + args.every
        pending = list(self.faults)
        end = self.t_start + seconds
        while True:
            now = time.time()
            prev_end = max((f.ended or 0) for f in self.faults)
            if (
                pending
                and now >= self.t_start + pending[0].planned
                and now >= prev_end + args.min_gap
            ):
                self.inject(pending.pop(0))
                continue
            last_end = max((f.ended or f.started or 0) for f in self.faults) if self.faults else 0
            if not pending and now >= end and (not self.faults or now >= last_end + args.settle):
                break
            if now >= next_summary:
                self.summary_line()
                next_summary = now + args.every
            self.watchdog()
            time.sleep(0.5)
        self.t_load_end = time.time()
        self.generated.append((time.time(), self.sim_generated()))

    def sim_generated(self) -> int | None:
        """Trades the exchange simulator has generated so far (its report endpoint)."""
        try:
            with urllib.request.urlopen(
                f"{self.settings.simulator_url}/_sim/report", timeout=5
            ) as r:
                rep = json.load(r)
            return sum(m["generated"] for m in rep["markets"].values())
        except Exception:
            return None

    def summary_line(self) -> None:
        k, st = self.kafka, self.store
        rates = (
            " ".join(
                f"{label} {r:.0f}/s" if (r := k.rate(t)) is not None else f"{label} ?"
                for label, t in (("trades", TRADES), ("quotes", QUOTES), ("txs", USER_TRANSACTIONS))
            )
            if k
            else "?"
        )
        last = st.latest() if st else None
        stored = f"stored trades +{last[2]}" if last else "stored ?"
        age = f"newest stored {last[1]:.1f} s old" if last and last[1] is not None else "newest ?"
        lag = k.lag[-1][1] if k and k.lag else {}
        lags = " ".join(f"{d.split('/')[0]} {n}" for d, n in lag.items()) or "?"
        say(f"in: {rates} | {stored}, {age} | lag {lags}")

    def watchdog(self) -> None:
        """A side process that died on its own (not killed by a fault) is reported and
        started again, so the soak goes on; the platform command has no supervisor."""
        if getattr(self, "_in_fault", False):
            return
        now = time.time()
        if now < getattr(self, "_next_watch", 0):
            return
        self._next_watch = now + 5
        for s in self.sides:
            pid = self.side_pids.get(s.name)
            if pid is not None and not alive(pid):
                msg = f"{s.name} (pid {pid}) exited on its own; starting it again"
                say(msg)
                self.events.append(f"{CLOCK.stamp()} {msg}")
                try:
                    say(f"{s.name}: {self.start_side(s)}")
                except Exception as e:
                    say(f"{s.name} did not start: {e}")
                    self.side_pids.pop(s.name, None)

    def inject(self, f: Fault) -> None:
        self._in_fault = True
        try:
            getattr(self, "fault_" + f.name.replace("-", "_"))(f)
        except Exception as e:
            f.note(f"fault raised {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            self._in_fault = False
            if f.started is not None and f.ended is None:
                f.ended = time.time()

    # -- the faults -------------------------------------------------------------------
    def fault_poison(self, f: Fault) -> None:
        f.started = time.time()
        say(
            f"FAULT poison: producing 8 records nobody planned for into {TRADES}"
            f" and {USER_TRANSACTIONS}"
        )
        self.poison = poison_set(time.time_ns() // 1000)
        p = producer(self.settings, max_request_size=2 * 1024 * 1024)
        try:
            futures = [
                (item, p.send(item.topic, key=item.key, value=item.value)) for item in self.poison
            ]
            for item, fut in futures:
                try:
                    meta = fut.get(timeout=60)
                    item.partition, item.offset, item.acked_at = (
                        meta.partition,
                        meta.offset,
                        time.time(),
                    )
                    fate = (
                        f"refused: {item.refused_by[:70]}"
                        if item.refused_by
                        else "valid (to be stored)"
                    )
                    f.note(
                        f"{item.name}: {item.topic}[{item.partition}]@{item.offset},"
                        f" {len(item.value)} bytes; codec: {fate}"
                    )
                except Exception as e:
                    f.note(f"{item.name}: NOT produced: {type(e).__name__}: {e}")
        finally:
            p.close(timeout=10)
        f.ended = time.time()

    def _kill_worker(self, f: Fault, want: str) -> None:
        """Wait for a drain run in state ``want`` (PENDING or RUNNING), SIGKILL the worker
        (and what ``--worker-kill`` says), start it again as the platform does."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter

        drains = [self.deployment_ids[d] for d in CONSUMERS]
        if want == "RUNNING":  # mid-batch: the price drain, which has the big batches
            drains = [self.deployment_ids["drain-prices/continuous"]]
        say(f"FAULT {f.name}: waiting for a drain run in state {want} to SIGKILL the worker")
        target, deadline = None, time.time() + self.args.fault_wait
        waiting_since = time.time()
        with get_client(sync_client=True) as client:
            while time.time() < deadline and target is None:
                try:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id={"any_": drains}),
                        flow_run_filter=FlowRunFilter(state={"type": {"any_": [want]}}),
                        limit=10,
                    )
                except Exception:
                    runs = []
                    time.sleep(2)
                for r in runs:
                    if r.state is None or r.state.timestamp.timestamp() < waiting_since - 2:
                        continue  # left Pending/Running by an earlier run: not this fault's
                    if want == "PENDING" or (
                        r.state
                        and (time.time() - r.state.timestamp.timestamp()) >= self.args.mid_batch_s
                    ):
                        target = r
                time.sleep(0.5)
            # the processes of every ingestion and trading run (this soak's, the trigger's,
            # or one left Scheduled by an earlier session that this worker picked up)
            long_pids = set()
            long_deps = {
                self.deployment_ids[plat.INGEST["simulator"]],
                self.deployment_ids[plat.TRADING],
            }
            rids = set(self.long_runs) | {
                r.id
                for r in (list(self.runs.runs.values()) if self.runs else [])
                if r.deployment_id in long_deps
            }
            for rid in rids:
                try:
                    ip = client.read_flow_run(rid).infrastructure_pid
                    if ip:
                        long_pids.add(int(ip))
                        long_pids.update(descendants(int(ip)))
                except Exception:
                    pass
        if target is None:
            f.note(
                f"no drain run reached {want} within {self.args.fault_wait:.0f} s; killing anyway"
            )
        wpid = self.side_pid("worker")
        if wpid is None:
            f.skipped = "no worker of this soak is running"
            f.note(f.skipped)
            return
        tree = descendants(wpid)
        for pid in tree:
            self.owned.add(pid, f"flow-run process of worker {wpid}: {cmdline(pid)}")
        roles = self._roles([wpid, *tree])
        scope = self.args.worker_kill
        victims = [wpid] + {
            "worker": [p for p in tree if _pgrp(p) == wpid],
            "drain": [p for p in tree if p not in long_pids],
            "tree": tree,
        }[scope]
        f.started = time.time()
        killed = sigkill_tree(victims)
        run_desc = (
            f"run {target.name} ({target.state.name} since"
            f" {CLOCK.stamp(target.state.timestamp.timestamp())})"
            if target is not None
            else "no drain run"
        )
        f.note(
            f"SIGKILLed worker {wpid} and {len(killed) - 1} of its {len(tree)} flow-run processes"
            f" ({scope}) with {run_desc}: " + "; ".join(f"{p} {roles.get(p, '?')}" for p in killed)
        )
        f.target_run = target.id if target is not None else None
        survivors = [p for p in tree if alive(p)]
        if survivors:
            f.note("left alive: " + "; ".join(f"{p} {roles.get(p, '?')}" for p in survivors))
        time.sleep(self.args.worker_down)
        worker = self.side("worker")
        assert worker is not None
        how = self.start_side(worker)
        f.ended = time.time()
        f.note(
            f"worker {how} again (pid {self.side_pids.get('worker')})"
            f" after {f.ended - f.started:.1f} s"
        )

    def _roles(self, pids: list[int]) -> dict[int, str]:
        """What each process is: its command and, via the runs' infrastructure pids (the
        process the worker started for a run), which flow run it belongs to."""
        runs_by_pid: dict[int, str] = {}
        for r in list(self.runs.runs.values()) if self.runs else []:
            try:
                ip = int(r.infrastructure_pid or 0)
            except ValueError:
                continue
            if ip:
                dep = self.runs.states.get(r.id, ("?",))[0].split("/")[0]
                for p in [ip, *descendants(ip)]:
                    runs_by_pid[p] = f"{dep} {r.name}"
        out = {}
        for p in [*pids]:
            cmd = cmdline(p).replace(str(Path(sys.executable).parent) + "/", "")
            cmd = re.sub(r"/work/\S+/", "", cmd).strip()
            out[p] = f"[{cmd[:60]}{' | run ' + runs_by_pid[p] if p in runs_by_pid else ''}]"
        return out

    def _restarted_long_runs(self, client) -> list[Any]:
        """Ingestion/trading runs started after the soak's own (the Crashed trigger's)."""
        out = []
        if self.runs is None:
            return out
        for rid, (dep, _, _state) in list(self.runs.states.items()):
            r = self.runs.runs.get(rid)
            by_trigger = (
                r is not None and r.created_by is not None and r.created_by.type == "AUTOMATION"
            )
            if (
                dep in (plat.INGEST["simulator"], plat.TRADING)
                and rid not in self.long_runs
                and by_trigger
            ):
                out.append(rid)
        return out

    def fault_worker_pending(self, f: Fault) -> None:
        self._kill_worker(f, "PENDING")

    def fault_worker_running(self, f: Fault) -> None:
        self._kill_worker(f, "RUNNING")

    def _stoppable(self, f: Fault, svc: Any) -> bool:
        """The stack stops a service through its pid file; a stale one (another run's
        failed ``stack up`` overwrote it) would stop nothing, and this soak never hunts
        for another process to end."""
        if read_pid(svc.pidfile) is not None:
            return True
        f.skipped = (
            f"{svc.pidfile} names no live process"
            f" ({svc.pidfile.read_text().strip() if svc.pidfile.exists() else 'missing'});"
            f" {svc.name} {'answers' if svc.answers() else 'does not answer'} on its port:"
            " not stopped"
        )
        f.note(f.skipped)
        return False

    def _stopped(self, f: Fault, svc: Any) -> None:
        if svc.answers():
            f.note(f"{svc.name} still answers after the stop")

    def fault_postgres(self, f: Fault) -> None:
        svc = services(self.settings, ("postgres",))[0]
        if not self._stoppable(f, svc):
            return
        say("FAULT postgres: stopping PostgreSQL (pg_ctl stop -m fast), then starting it")
        f.started = time.time()
        self.restore["postgres"] = lambda: up([svc])
        svc.down()
        f.note(f"stopped after {time.time() - f.started:.1f} s")
        self._stopped(f, svc)
        time.sleep(self.args.pg_down)
        up([svc])
        self.restore.pop("postgres", None)
        f.ended = time.time()
        f.note(f"PostgreSQL answers again, {f.ended - f.started:.1f} s after the stop began")

    def fault_kafka(self, f: Fault) -> None:
        svc = services(self.settings, ("kafka",))[0]
        pid = read_pid(svc.pidfile)
        if pid is None:
            f.skipped = "no Kafka pid file"
            f.note(f.skipped)
            return
        say(f"FAULT kafka: SIGSTOP broker process group {pid} for {self.args.kafka_down:.0f} s")
        f.started = time.time()
        self.restore["kafka"] = lambda: os.killpg(pid, signal.SIGCONT)
        os.killpg(pid, signal.SIGSTOP)
        try:
            time.sleep(self.args.kafka_down)
        finally:
            os.killpg(pid, signal.SIGCONT)
            self.restore.pop("kafka", None)
        f.ended = time.time()
        f.note("SIGCONT sent")

    def fault_prefect(self, f: Fault) -> None:
        """Stop the server through the stack (``stack.services``) and start it again. When
        the stack's pid file has lost track of the server (a later ``stack up`` that could
        not bind overwrote it), the server is paused instead (SIGSTOP/SIGCONT, like the
        Kafka fault) for the same time: this soak ends no process it cannot name by the
        stack's pid file; the report says which of the two happened."""
        svc = services(self.settings, ("prefect",))[0]
        down = self.args.prefect_down
        if read_pid(svc.pidfile) is None:
            self._pause_prefect(f, svc, down)
            return
        say(f"FAULT prefect: stopping the Prefect server for {down:.0f} s")
        f.started = time.time()
        self.restore["prefect"] = lambda: up([svc])
        svc.down()
        f.note(f"stopped after {time.time() - f.started:.1f} s")
        self._stopped(f, svc)
        self._wait_out(f.started + down)
        up([svc])
        self.restore.pop("prefect", None)
        f.ended = time.time()
        f.note(f"server answers again, {f.ended - f.started:.1f} s after the stop began")

    def _pause_prefect(self, f: Fault, svc: Any, down: float) -> None:
        port = _svc_port(svc)
        pid = listener_pid(port)
        stale = svc.pidfile.read_text().strip() if svc.pidfile.exists() else "missing"
        venv = str(Path(sys.executable).parent)
        if pid is None or "prefect server" not in cmdline(pid) or venv not in cmdline(pid):
            f.skipped = (
                f"{svc.pidfile} is stale ({stale}) and the server on :{port} is not this checkout's"
                f" ({cmdline(pid)[:80] if pid else 'nothing listens'}): not touched"
            )
            f.note(f.skipped)
            return
        say(
            f"FAULT prefect: {svc.pidfile} names no live process ({stale}); pausing the server that"
            f" listens on :{port} (pid {pid}) with SIGSTOP for {down:.0f} s instead of stopping it"
        )
        target = pid if _pgrp(pid) == pid else None
        sig = (lambda s: os.killpg(pid, s)) if target else (lambda s: os.kill(pid, s))
        f.started = time.time()
        self.restore["prefect"] = lambda: sig(signal.SIGCONT)
        sig(signal.SIGSTOP)
        f.note(
            f"paused (SIGSTOP) pid {pid} [{cmdline(pid)[:80]}]: the stack's pid file is stale"
            f" ({stale}),"
            " so this is a hung server for the clients, not a restart"
        )
        try:
            self._wait_out(f.started + down)
        finally:
            sig(signal.SIGCONT)
            self.restore.pop("prefect", None)
        deadline = time.time() + 120
        while not svc.answers() and time.time() < deadline:
            time.sleep(1)
        f.ended = time.time()
        f.note(
            f"SIGCONT sent; server {'answers' if svc.answers() else 'does NOT answer'}"
            f" {f.ended - f.started:.1f} s after the pause began"
        )

    def _wait_out(self, until: float) -> None:
        next_summary = time.time() + self.args.every
        while time.time() < until:
            time.sleep(0.5)
            if time.time() >= next_summary:
                self.summary_line()
                next_summary += self.args.every

    # -- end of the run ---------------------------------------------------------------
    def undo(self) -> None:
        for name, fn in list(self.restore.items()):
            try:
                say(f"restoring {name}")
                fn()
            except Exception as e:
                say(f"restoring {name} failed: {e}")
            self.restore.pop(name, None)

    def finish(self) -> None:
        """Cancel the long runs, drain what is left, stop the side processes (always)."""
        try:
            self._wind_down()
        except (Exception, KeyboardInterrupt) as e:
            say(f"winding down failed: {type(e).__name__}: {e}")
            self.events.append(f"winding down failed: {type(e).__name__}: {e}")
        finally:
            for p in (self.store, self.kafka, self.runs, self.reaper):
                if p is not None:
                    p.stop()
            for side in reversed(self.sides):
                try:
                    self.stop_side(side)
                except Exception as e:
                    say(f"stopping {side.name}: {e}")
            self.stop_leftovers()
            try:
                self.cancel_triggered_runs()
            except Exception as e:
                say(f"cancelling runs the soak caused: {type(e).__name__}: {e}")

    def cancel_triggered_runs(self) -> None:
        """Ingestion/trading runs created during the soak (the Crashed trigger restarting a
        run this soak crashed) that are still open once its worker is gone would be started
        by the next worker on the pool, beside that platform's own ingestion: cancelled."""
        from datetime import UTC, datetime

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
        from prefect.states import Cancelled

        time.sleep(10)  # the trigger reacts to the last Crashed state within seconds
        ids = [self.deployment_ids[d] for d in (plat.INGEST["simulator"], plat.TRADING)]
        since = datetime.fromtimestamp(self.t_start - self.t_setup, UTC)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": ids}),
                flow_run_filter=FlowRunFilter(
                    state={"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING"]}}
                ),
                limit=200,
            )
            done = []
            for r in runs:
                by_trigger = r.created_by is not None and r.created_by.type == "AUTOMATION"
                if by_trigger and r.created is not None and r.created >= since:
                    client.set_flow_run_state(
                        r.id,
                        Cancelled(
                            message="bench.soak: a trigger started it after the soak crashed"
                            " its run",
                        ),
                        force=True,
                    )
                    done.append(f"{r.name} ({r.state.name if r.state else '?'})")
        if done:
            msg = (
                "cancelled runs the Crashed trigger created for this soak's crashed runs:"
                f" {', '.join(done)}"
            )
            say(msg)
            self.events.append(msg)

    def _wind_down(self) -> None:
        say("stopping ingestion and trading, draining what is left ...")
        if self.reaper is not None:
            self.reaper.stop()  # it would start following drains again (reaper.keep_following)
        self.final["cancel"] = self._stop_long_runs()
        plat.cancel(plat.following_runs())  # as the main command does: they hold the slots
        deadline = time.time() + self.args.final_minutes * 60
        drains: dict[str, str] = {}
        for name in (*CONSUMERS, reaper.AGGREGATE):
            attempts = 1 if name == reaper.AGGREGATE else 6
            ok, text = self._final_run(name, deadline, attempts=attempts)
            if not ok and name in CONSUMERS:
                text += " | " + self._drain_in_process(name)
            drains[name] = text
        self.final["drains"] = drains

    def _drain_in_process(self, name: str) -> str:
        """The deployment could not drain (its runs kept being Cancelled or failing): drain
        here with what the flow runs (``tasks.drain.loop.drain``, the same consumer, sink
        and DLQ source), so the end state shows what the data path did, and say so."""
        from tasks.drain.loop import drain
        from tasks.drain.mongo import MongoSink
        from tasks.drain.postgres import PostgresSink

        consumer_name, topics = CONSUMERS[name]
        source = DRAIN_SOURCES[topics[0]]
        rows = 0
        try:
            for _ in range(3):  # the long runs are stopped: this ends; a fence means a run of
                sink = (  # the deployment is draining after all, so leave it to that one
                    PostgresSink(self.settings.pg_dsn)
                    if name.startswith("drain-prices")
                    else MongoSink(self.settings.mongo_url, self.settings.mongo_db)
                )
                res = drain(
                    sink,
                    consumer_name,
                    list(topics),
                    dlq_source=source,
                    settings=self.settings,
                    max_seconds=120,
                )
                rows += sum(res.written.rows.values())
                if not sum(res.lag.values()) or res.fenced:
                    break
            text = (
                f"in-process fallback drain (tasks.drain.loop.drain): {rows} rows, {res.stopped},"
                f" {sum(res.lag.values())} records left, fenced {res.fenced}x"
            )
        except Exception as e:
            text = f"in-process fallback drain failed: {type(e).__name__}: {e}"
        say(f"  {name}: {text}")
        self.events.append(f"{name}: the deployment did not drain at the end; {text}")
        return text

    def _live_long_runs(self) -> list[Any]:
        """Ingestion and trading runs of this soak (and those the Crashed trigger started
        meanwhile) that are not in a final state."""
        from prefect.client.orchestration import get_client

        live = []
        with get_client(sync_client=True) as client:
            for rid in list(self.long_runs) + self._restarted_long_runs(client):
                try:
                    st = client.read_flow_run(rid).state
                    if st is not None and not st.is_final():
                        live.append(rid)
                except Exception:
                    pass
        return live

    def _trades_end(self) -> int | None:
        c = consumer(None, self.settings, request_timeout_ms=8000)
        try:
            tps = [TopicPartition(TRADES, p) for p in c.partitions_for_topic(TRADES) or ()]
            return sum(c.end_offsets(tps).values())
        except Exception:
            return None
        finally:
            c.close()

    def _quiet(self, within_s: float) -> bool:
        """True once no trade arrived in Kafka for 10 s (checked within ``within_s``)."""
        deadline = time.time() + within_s
        last = self._trades_end()
        while time.time() < deadline:
            time.sleep(10)
            now = self._trades_end()
            if now is not None and now == last:
                return True
            last = now
        return False

    def _stop_long_runs(self) -> str:
        """Cancel through Prefect (as the platform command does). A run Prefect cannot
        cancel is this soak's own to end: one with no live process (its worker died before
        starting it, or the process is gone) is set Cancelled; one whose process runs on
        (an orphan of a killed worker, which no worker can reach) is SIGTERMed, by pid.
        Runs the Crashed trigger starts meanwhile are handled the same way. All reported."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        notes, t0 = [], time.time()
        for _ in range(3):
            live = self._live_long_runs()
            if not live and self._quiet(30):
                notes.append(
                    f"ingestion and trading stopped {time.time() - t0:.0f} s after the cancel"
                )
                break
            if live:
                plat.cancel(live)
            with get_client(sync_client=True) as client:
                for rid in self._live_long_runs():
                    r = client.read_flow_run(rid)
                    state = r.state.name if r.state else "?"
                    pid = int(r.infrastructure_pid) if (r.infrastructure_pid or "").isdigit() else 0
                    procs = [
                        p
                        for p in ([pid, *descendants(pid)] if pid else [])
                        if self.owned.still_mine(p)
                    ]
                    if procs:
                        for p in procs:
                            with contextlib.suppress(ProcessLookupError, PermissionError):
                                os.kill(p, signal.SIGTERM)
                        notes.append(
                            f"{r.name} still {state} after the cancel, its process running"
                            f" on: SIGTERMed {procs}"
                        )
                    else:
                        client.set_flow_run_state(
                            rid,
                            Cancelled(message="bench.soak: no process left to cancel"),
                            force=True,
                        )
                        notes.append(
                            f"{r.name} still {state} after the cancel with no process"
                            " (its worker was killed): set Cancelled"
                        )
            if self._quiet(60) and not self._live_long_runs():
                notes.append(f"stopped {time.time() - t0:.0f} s after the cancel")
                break
        else:
            notes.append(f"STILL live or publishing {time.time() - t0:.0f} s after the cancel")
        msg = "; ".join(notes)
        if len(notes) > 1:
            say(msg)
            self.events.append(msg)
        return msg

    def _final_run(self, name: str, deadline: float, attempts: int) -> tuple[bool, str]:
        """Run a deployment until a run Completes with nothing left (a scheduled run holding
        the one-at-a-time slot makes ours Cancelled: wait and try again)."""
        out, ok = [], False
        for _ in range(attempts):
            left = deadline - time.time()
            if left < 30:
                out.append("no time left")
                break
            try:
                final = plat.FINAL_DRAIN if name in CONSUMERS else {}
                fr = reaper.run_deployment(name, wait_s=min(300, left), **final)
                st = fr.state
                out.append(
                    f"{fr.name} {st.name if st else '?'}"
                    + (f" ({st.message[:120]})" if st and st.message else "")
                )
                if (
                    st is not None
                    and st.is_completed()
                    and "left for the next run" not in (st.message or "")
                ):
                    ok = True
                    break
            except Exception as e:
                out.append(f"{type(e).__name__}: {str(e)[:160]}")
            time.sleep(15)
        say(f"  final {name}: {' / '.join(out)}")
        return ok, " / ".join(out)

    def stop_leftovers(self) -> None:
        """Flow-run processes this soak's workers started that outlived everything (orphans
        of a killed worker that Prefect could not cancel): ended by pid, and reported."""
        left = []
        wpids = {self.side_pids.get("worker")}
        for pid, (_, what) in list(self.owned.procs.items()):
            if ("flow" in what) and pid not in wpids and self.owned.still_mine(pid):
                left.append((pid, cmdline(pid)))
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if left:
            msg = f"flow-run processes left running at the end (orphans), SIGTERMed: {left}"
            say(msg)
            self.events.append(msg)


def _pgrp(pid: int) -> int | None:
    st = _proc_stat(pid)
    return int(st[2]) if st else None


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port`` (from /proc/net/tcp and fd links)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inode = parts[9]
                break
        if inode:
            break
    if not inode:
        return None
    want = f"socket:[{inode}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == want:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def _svc_port(svc: Any) -> int:
    if hasattr(svc, "host_port"):
        return svc.host_port[1]
    return svc.url.port


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _mmss(s: float) -> str:
    return f"{int(s // 60):02d}:{int(s % 60):02d}"


# ----------------------------------------------------------------------------- analysis
def recoveries(soak: Soak, fresh_s: float) -> None:
    """For each fault, from its end: ``moving`` = the first poll that sees trades stored
    after that end; ``recovered`` = the first such poll with the newest stored trade under
    ``fresh_s`` old; ``baseline`` = the first such poll with the newest stored trade no
    older than the worst age seen in the 120 s before the fault (how the platform ran on
    this machine before it; per-minute drains make the age a saw-tooth)."""
    end = soak.t_load_end or time.time()
    ticks = [x for x in (soak.store.ticks if soak.store else []) if x[0] <= end]
    for f in soak.faults:
        if f.started is None or f.ended is None:
            continue
        before = [a for t, a, _ in ticks if f.started - 120 <= t < f.started and a is not None]
        f.baseline_s = max(before) * 1.1 if before else None
        base = None
        for t, _, stored in ticks:
            if t <= f.ended:
                base = stored
        for t, age, stored in ticks:
            if t < f.ended:
                continue
            if base is None:
                base = stored
            if stored <= base:
                continue
            f.moving = f.moving or t
            if age is not None and age < fresh_s and f.recovered is None:
                f.recovered = t
            if (
                age is not None
                and f.baseline_s is not None
                and age <= f.baseline_s
                and f.baseline is None
            ):
                f.baseline = t
            if f.recovered is not None and (f.baseline is not None or f.baseline_s is None):
                break


def windows(soak: Soak, end: float) -> list[tuple[float, float, str]]:
    return [
        (f.started, f.recovered or f.baseline or end, f.name)
        for f in soak.faults
        if f.started is not None
    ]


def in_window(t: float, wins: list[tuple[float, float, str]]) -> bool:
    return any(a <= t <= b for a, b, _ in wins)


def drain_runs(soak: Soak, t_from: float, t_to: float) -> dict[str, list[dict[str, Any]]]:
    """Every run of the drains expected to start in [t_from, t_to]: states with times,
    Pending and Running spans, the summary artifact's numbers."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    out: dict[str, list[dict[str, Any]]] = {}
    with get_client(sync_client=True) as client:
        for name in (*CONSUMERS, reaper.AGGREGATE, plat.INGEST["simulator"], plat.TRADING):
            runs, offset = [], 0
            while True:  # the API returns at most 200 per page
                page = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id={"any_": [soak.deployment_ids[name]]}),
                    flow_run_filter=FlowRunFilter(
                        expected_start_time=FlowRunFilterExpectedStartTime(
                            after_=datetime.fromtimestamp(t_from - 3600, UTC),
                            before_=datetime.fromtimestamp(t_to, UTC),
                        )
                    ),
                    limit=200,
                    offset=offset,
                )
                runs += page
                offset += len(page)
                if len(page) < 200:
                    break
            # due before the soak: only those still open when it began or active during it
            runs = [
                r
                for r in runs
                if (r.expected_start_time and r.expected_start_time.timestamp() >= t_from)
                or r.end_time is None
                or r.end_time.timestamp() >= t_from
            ]
            rows = []
            for r in runs:
                states = client.read_flow_run_states(r.id)
                states.sort(key=lambda s: s.timestamp)
                row: dict[str, Any] = {
                    "id": r.id,
                    "name": r.name,
                    "expected": r.expected_start_time.timestamp()
                    if r.expected_start_time
                    else None,
                    "final": r.state.name if r.state else "?",
                    "final_type": r.state.type.value if r.state else "?",
                    "message": (r.state.message or "") if r.state else "",
                    "states": [(s.name, s.timestamp.timestamp(), s.message or "") for s in states],
                    "auto": r.auto_scheduled,
                    "before": bool(
                        r.expected_start_time and r.expected_start_time.timestamp() < t_from
                    ),
                }
                pend = run_start = run_end = None
                pending_s = 0.0
                for i, s in enumerate(states):
                    nxt = (
                        states[i + 1].timestamp.timestamp() if i + 1 < len(states) else time.time()
                    )
                    if s.type.value == "PENDING":
                        pending_s += nxt - s.timestamp.timestamp()
                        pend = pend or s.timestamp.timestamp()
                    if s.type.value == "RUNNING" and run_start is None:
                        run_start = s.timestamp.timestamp()
                    if (
                        run_start is not None
                        and s.type.value != "RUNNING"
                        and run_end is None
                        and s.timestamp.timestamp() > run_start
                    ):
                        run_end = s.timestamp.timestamp()
                if run_start is not None and run_end is None:
                    run_end = time.time()
                row.update(pending_s=pending_s, running=(run_start, run_end))
                rows.append(row)
            ids = [r["id"] for r in rows]
            arts = []
            for i in range(0, len(ids), 100):
                arts += client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=ids[i : i + 100])
                    ),
                    limit=200,
                )
            by_run = {a.flow_run_id: a for a in arts}
            for row in rows:
                a = by_run.get(row["id"])
                if a is not None and a.description:
                    m = ARTIFACT.search(a.description)
                    if m:
                        first = m["first"]
                        row["first_write_s"] = None if first == "None" else float(first)
                        row["longest_wait_s"] = float(m["wait"])
                        row["stopped"] = m["stopped2"]
                    try:
                        data = json.loads(a.data) if isinstance(a.data, str) else a.data
                        row["records"] = sum(
                            int(x["records"] or 0) for x in data if x.get("kind") == "topic"
                        )
                        row["lag_left"] = sum(
                            int(x["lag_left"] or 0) for x in data if x.get("kind") == "topic"
                        )
                    except Exception:
                        pass
            rows.sort(key=lambda r: r["expected"] or 0)
            out[name] = rows
    return out


def idle_stretches(soak: Soak, wins, end: float) -> dict[str, dict[str, Any]]:
    """Per drain, from the stored offsets themselves (the probe reads them every
    ``KafkaProbe.every`` s): an idle stretch runs from the first poll that saw records
    waiting (lag > 0) to the last poll that still saw the same stored offsets with records
    waiting. Whatever the cause (a run starting up, stalled, handing over, killed, or no run
    at all), the drain stored nothing for at least that long while records waited. Polls
    that failed (the database down) neither start nor end a stretch."""
    kp = soak.kafka
    lags = dict(kp.lag) if kp else {}
    out: dict[str, dict[str, Any]] = {}
    for name in CONSUMERS:
        pts = [
            (t, done[name], lags.get(t, {}).get(name))
            for t, done in (kp.stored if kp else [])
            if t <= end and name in done
        ]
        stretches: list[tuple[float, float]] = []
        since = last = None
        prev = None
        for t, done, lag in pts:
            if prev is not None and done == prev and lag:
                last = t
            else:
                if since is not None and last is not None and last > since:
                    stretches.append((since, last))
                since, last = (t, t) if lag else (None, None)
            prev = done
        if since is not None and last is not None and last > since:
            stretches.append((since, last))
        outside = [(a, b) for a, b in stretches if not any(x <= b and a <= y for x, y, _ in wins)]
        viol = [
            f"{name.split('/')[0]} idle {b - a:.0f} s from {CLOCK.stamp(a)}"
            for a, b in outside
            if b - a > 10
        ]
        worst = max(stretches, key=lambda ab: ab[1] - ab[0], default=None)
        worst_out = max((b - a for a, b in outside), default=0.0)
        out[name] = {
            "total": sum(b - a for a, b in stretches),
            "outside": sum(b - a for a, b in outside),
            "worst": worst,
            "worst_out": worst_out,
            "violations": viol,
        }
    return out


def read_topic_since(
    settings: config.Settings,
    topic: str,
    start: dict[int, int] | None = None,
    since_ms: int | None = None,
    timeout_ms: int = 5000,
):
    """Every record of ``topic`` from ``start`` offsets (or the first at/after ``since_ms``)
    up to the end seen now."""
    c = consumer(None, settings, consumer_timeout_ms=timeout_ms, max_poll_records=10_000)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        ends = c.end_offsets(tps)
        begins = c.beginning_offsets(tps)
        if since_ms is not None:
            found = c.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            if start is not None:
                at = start.get(tp.partition, begins[tp])
            elif since_ms is not None:
                at = found[tp].offset if found.get(tp) is not None else ends[tp]
            else:
                at = begins[tp]
            c.seek(tp, max(at, begins[tp]))
        remaining = {tp for tp in tps if c.position(tp) < ends[tp]}
        while remaining:
            batch = c.poll(timeout_ms=timeout_ms, max_records=10_000)
            if not batch:
                break
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset < ends[tp]:
                        yield tp.partition, rec
                if c.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        c.close()


def end_state(soak: Soak) -> dict[str, Any]:
    s = soak.settings
    out: dict[str, Any] = {"problems": []}
    with psycopg2.connect(s.pg_dsn, connect_timeout=10) as conn:
        verdict = verify.verify_trades(conn, s, VENUE, TRADES, soak.since_us)
        out["trades"] = verdict
        out["problems"] += verdict.problems or ([] if verdict.symbols else ["no trades stored"])
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM quotes WHERE venue = %s AND recv_us >= %s",
                (VENUE, soak.since_us),
            )
            stored_quotes = cur.fetchone()[0]
            poison_rows = {}
            for p in soak.poison:
                if p.topic != TRADES:
                    continue
                try:
                    d = json.loads(p.value)
                except ValueError:
                    continue
                if not isinstance(d, dict) or "trade_id" not in d:
                    continue
                cur.execute(
                    "SELECT count(*) FROM trades WHERE venue = %s AND trade_id = %s",
                    (POISON_VENUE, d["trade_id"]),
                )
                poison_rows[p.name] = cur.fetchone()[0]
    keys = set()
    for _, rec in read_topic_since(s, QUOTES, since_ms=soak.since_us // 1000):
        try:
            q = codec.decode(rec.value)
        except codec.CodecError:
            continue
        if isinstance(q, Quote) and q.venue == VENUE and q.recv_us >= soak.since_us:
            keys.add((q.symbol, q.event_us, q.recv_us))
    out["quotes"] = (stored_quotes, len(keys))
    if stored_quotes != len(keys) or not keys:
        out["problems"].append(f"quotes: {stored_quotes} stored, {len(keys)} distinct received")
    with pymongo.MongoClient(s.mongo_url, serverSelectionTimeoutMS=10000) as m:
        db = m[s.mongo_db]
        balances, folded = wallet_balances(db), fold_transactions(db)
        out["wallets"] = (
            balances == folded,
            len(balances),
            db.transactions.estimated_document_count(),
        )
        if balances != folded:
            differ = [k for k in set(balances) | set(folded) if balances.get(k) != folded.get(k)]
            out["problems"].append(
                f"wallets: {len(differ)} differ from the fold, e.g. {differ[:3]}"
            )
        ptx = [p for p in soak.poison if p.topic == USER_TRANSACTIONS]
        out["poison_tx_stored"] = sum(
            db.transactions.count_documents({"_id": json.loads(p.value)["tx_id"]}) for p in ptx
        )
    # the drains' DLQ records since the start
    expected = {
        (p.topic, p.partition, p.offset): p for p in soak.poison if p.refused_by and p.offset >= 0
    }
    got: Counter[tuple[str, int, int]] = Counter()
    unexpected: list[str] = []
    others = Counter()
    consumers = {c for c, _ in CONSUMERS.values()}
    for _, rec in read_topic_since(s, DLQ, start=soak.dlq_start):
        try:
            doc = dlq.parse(rec.value)
        except Exception:
            others["unparseable"] += 1
            continue
        ctx = doc.get("context") or {}
        if (
            not str(doc.get("source", "")).startswith("drain.")
            or ctx.get("consumer") not in consumers
        ):
            others[str(doc.get("source"))] += 1
            continue
        key = (ctx.get("topic"), ctx.get("partition"), ctx.get("offset"))
        got[key] += 1
        if key not in expected:
            unexpected.append(f"{key[0]}[{key[1]}]@{key[2]}: {doc.get('reason', '')[:100]}")
    missing = [p for k, p in expected.items() if k not in got]
    dup = {k: n for k, n in got.items() if n > 1}
    out["dlq"] = {
        "expected": len(expected),
        "found": sum(1 for k in expected if k in got),
        "missing": [f"{p.name} {p.topic}[{p.partition}]@{p.offset}" for p in missing],
        "unexpected": unexpected,
        "duplicated": dup,
        "others": dict(others),
    }
    if missing or unexpected:
        out["problems"].append(
            f"DLQ: {len(missing)} poison records missing, {len(unexpected)} unexpected"
        )
    valid = [p for p in soak.poison if not p.refused_by and p.offset >= 0]
    for p in valid:
        n = poison_rows.get(p.name, 0) if p.topic == TRADES else None
        if n != 1:
            out["problems"].append(f"{p.name} (valid to the codec): stored {n} times, not once")
    wrongly_stored = {
        k: n
        for k, n in poison_rows.items()
        if n and any(p.name == k and p.refused_by for p in soak.poison)
    }
    if wrongly_stored or out.get("poison_tx_stored"):
        out["problems"].append(
            f"refused poison stored anyway: {wrongly_stored} tx {out.get('poison_tx_stored')}"
        )
    out["poison_rows"] = poison_rows
    return out


# ----------------------------------------------------------------------------- report
def report(soak: Soak) -> None:
    args = soak.args
    end = soak.t_load_end or time.time()
    recoveries(soak, args.fresh_s)
    st, kp = soak.store, soak.kafka
    # measured from the load's start, while trades are offered (once the load stops the
    # newest stored trade's age grows by the second)
    ticks = [
        (t, a) for t, a, _ in (st.ticks if st else []) if a is not None and soak.t_start <= t <= end
    ]
    # start-up: until the newest stored trade is first fresh, the platform catches up
    # with what came before the load (a stack run before resumes from its last ids): a
    # window of its own, printed, not steady operation
    warm = next((t for t, a in ticks if a < args.fresh_s), end)
    wins = [(soak.t_start, warm, "start-up"), *windows(soak, end)]
    samples = [x for x in (st.samples if st else []) if x[0] >= soak.t_start]
    outside = [fr for ta, ev, fr in samples if not in_window(ta, wins) and not in_window(ev, wins)]
    every = [fr for _, _, fr in samples]
    ages_out = [a for t, a in ticks if not in_window(t, wins)]
    ages_all = [a for _, a in ticks]
    # where the outside-window staleness was: consecutive polls with the worst age over
    # the freshness target, as (first poll, last poll, worst age)
    stale: list[list[float]] = []
    for t, a in ticks:
        if a <= args.fresh_s or in_window(t, wins):
            continue
        if stale and t - stale[-1][1] <= 2.5:
            stale[-1][1], stale[-1][2] = t, max(stale[-1][2], a)
        else:
            stale.append([t, t, a])

    # offered load over the load period
    def avg_rate(topic: str) -> float | None:
        pts = [(t, e[topic]) for t, e in (kp.ends if kp else []) if soak.t_start <= t <= end]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    rates = {t: avg_rate(t) for t in (TRADES, QUOTES, USER_TRANSACTIONS)}
    gen = [(t, n) for t, n in soak.generated if n is not None]
    sim_rate = (
        (gen[-1][1] - gen[0][1]) / (gen[-1][0] - gen[0][0])
        if len(gen) == 2 and gen[1][0] > gen[0][0]
        else None
    )
    lag_max: dict[str, tuple[int, float]] = {}
    for t, lags in kp.lag if kp else []:
        for d, n in lags.items():
            if n > lag_max.get(d, (-1, 0))[0]:
                lag_max[d] = (n, t)
    try:
        runs = drain_runs(soak, soak.t_start - 30, end)
    except Exception as e:
        runs = {}
        soak.events.append(f"reading drain runs failed: {type(e).__name__}: {e}")
    try:
        final = end_state(soak)
    except Exception as e:
        final = {
            "problems": [f"end-state check failed: {type(e).__name__}: {e}"],
            "error": traceback.format_exc(),
        }

    # drain idle while lag > 0, from the stored offsets (see idle_stretches)
    idle = idle_stretches(soak, wins, end)
    counts: dict[str, Counter[str]] = {}
    stuck: list[str] = []
    for name, rows in runs.items():
        c = Counter()
        for r in rows:
            if r["expected"] and r["expected"] > end:
                continue
            c[r["final"]] += 1
            if r["pending_s"] > PENDING_STUCK_S:
                stuck.append(
                    f"{name.split('/')[0]} {r['name']} Pending {r['pending_s']:.0f} s,"
                    f" then {r['final']}"
                )
        counts[name] = c
    violations = [v for d in idle.values() for v in d["violations"]]
    idle_total = sum(d["total"] for d in idle.values())
    idle_out = sum(d["outside"] for d in idle.values())
    idle_ok = not violations

    p99_out = pct(outside, 99)
    worst_rec = None
    rec_ok = True
    for f in soak.faults:
        if f.started is None:
            continue
        r = None if f.recovered is None else f.recovered - (f.ended or f.started)
        if r is None or r > args.recovery_s:
            rec_ok = False
        if r is not None and (worst_rec is None or r > worst_rec[0]):
            worst_rec = (r, f.name)

    faults = ", ".join(f.name for f in soak.faults) or "none"
    kafka_in = ", ".join(
        f"{label} {fmt_rate(rates[t])}"
        for label, t in (("trades", TRADES), ("quotes", QUOTES), ("user txs", USER_TRANSACTIONS))
    )

    def stats(xs: list[float]) -> str:
        top = max(xs) if xs else None
        return (
            f"n={len(xs):>7}  p50 {fmt_s(pct(xs, 50))}  p99 {fmt_s(pct(xs, 99))}  max {fmt_s(top)}"
        )

    L = ["", "=" * 100]
    add = L.append
    add(
        f"SOAK RESULTS  planned {args.minutes:g} min, load ran {_mmss(end - soak.t_start)}"
        f" (+ set-up {_mmss(soak.t_setup)}); faults: {faults}; worker kill: {args.worker_kill}"
    )
    add(
        f"offered load: simulator {fmt_rate(sim_rate)} trades (its report, rate setting"
        f" {soak.settings.simulator_rate}); into Kafka (log end offsets): {kafka_in}"
    )
    add(
        "freshness = when a trade row was first seen in PostgreSQL - its event_us"
        f" (1 in {args.sample_every} trade ids, polled every 1 s):"
    )
    add(
        f"  start-up: the newest stored trade was first under {args.fresh_s:g} s old"
        f" {warm - soak.t_start:.0f} s after the load started (a window, like a fault's)"
    )
    add(f"  outside fault windows  {stats(outside)}")
    add(f"  whole run              {stats(every)}")
    add(
        "  newest stored trade age (now - max(event_us), worst symbol, every second):"
        f" outside windows p50 {fmt_s(pct(ages_out, 50))} p99 {fmt_s(pct(ages_out, 99))}"
        f" max {fmt_s(max(ages_out) if ages_out else None)};"
        f" whole run max {fmt_s(max(ages_all) if ages_all else None)}"
    )
    if stale:
        longest = sorted(stale, key=lambda x: x[1] - x[0], reverse=True)[:5]
        add(
            f"  stale outside windows (worst age > {args.fresh_s:g} s), {len(stale)} stretches,"
            " longest: "
            + "; ".join(
                f"+{_mmss(a - soak.t_start)}..+{_mmss(b - soak.t_start)} up to {fmt_s(top)}"
                for a, b, top in sorted(longest)
            )
        )
    add(
        "faults: recovery = from the fault's end (restart done / broker resumed / poison acked)"
        " to the first 1-s poll that saw trades stored after that end and the newest stored"
        f" trade < {args.fresh_s:g} s old; 'moving' = first new trades stored; 'as before' ="
        " newest stored trade no older than the worst age in the 120 s before the fault"
        " (+10 %). Window = fault start .. recovery (else 'as before', else the run's end)."
    )
    for f in soak.faults:
        if f.started is None:
            add(f"  {f.name:15} planned +{_mmss(f.planned)}: not injected ({f.skipped or '?'})")
            continue
        e = f.ended or f.started

        def since(t: float | None, e: float = e) -> str:
            return "never" if t is None else f"{t - e:.1f} s"

        add(
            f"  {f.name:15} start {CLOCK.stamp(f.started)} end {CLOCK.stamp(f.ended)}"
            f" ({e - f.started:5.1f} s)  recovery {since(f.recovered):>8}"
            f"  moving {since(f.moving):>8}"
            f"  as before ({fmt_s(f.baseline_s, 0)}) {since(f.baseline):>8}"
        )
    add(
        "consumer lag (log end - offsets stored with the data, every 2 s): max "
        + ", ".join(f"{d.split('/')[0]} {n} at {CLOCK.stamp(t)}" for d, (n, t) in lag_max.items())
    )
    add(
        f"drain idle with lag: stretches in which polls every {KafkaProbe.every:g} s saw records"
        " waiting and the offsets stored with the data unchanged (a lower bound, by at most"
        " one poll interval)"
    )
    add(
        f"  total {idle_total:.0f} s, outside fault windows {idle_out:.0f} s;"
        f" stretches > 10 s outside fault windows: {len(violations)}"
    )
    for name, d in idle.items():
        w = d["worst"]
        add(
            f"  {name:34} idle {d['total']:5.0f} s, outside fault windows {d['outside']:.0f} s"
            f" (longest {d['worst_out']:.0f} s); longest of all"
            + (f" {w[1] - w[0]:.0f} s from {CLOCK.stamp(w[0])}" if w else " -")
        )
    for name in runs:
        c = counts.get(name, Counter())
        add(f"  {name:34} runs: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    add(
        f"  runs Pending > {PENDING_STUCK_S:.0f} s: {len(stuck)}"
        + (f" ({'; '.join(stuck)})" if stuck else "")
    )
    add("end state (load stopped, long runs cancelled, each drain ran once more):")
    v = final.get("trades")
    for c in v.symbols if v is not None else []:
        add(
            f"  {c.symbol}: {c.stored} trades stored, ids {c.first_id}..{c.last_id},"
            f" {c.holes} missing, {c.duplicates_in_kafka} duplicated in Kafka,"
            f" {c.missing_from_store} in Kafka not stored"
        )
    if "quotes" in final:
        stored_q, received_q = final["quotes"]
        add(f"  quotes: {stored_q} stored, {received_q} distinct received since the start")
    if "wallets" in final:
        eq, nw, ntx = final["wallets"]
        how = "EQUAL" if eq else "DIFFER FROM"
        add(f"  wallets: {nw} {how} the fold of {ntx} stored transactions")
    if "dlq" in final:
        d = final["dlq"]
        add(
            f"  DLQ from the drains since the start: {d['found']} of {d['expected']} refused"
            f" poison records, {len(d['missing'])} missing, {len(d['unexpected'])} unexpected,"
            f" {len(d['duplicated'])} written twice; other DLQ records since the start:"
            f" {d['others'] or 'none'}"
        )
        L.extend(f"    missing: {x}" for x in d["missing"][:10])
        L.extend(f"    unexpected: {x}" for x in d["unexpected"][:10])
    for p in soak.poison:
        if not p.refused_by:
            n = final.get("poison_rows", {}).get(p.name)
            add(f"  '{p.name}' is valid to the codec: stored {n} time(s) (expected once)")
    L.extend(f"  PROBLEM: {x}" for x in final.get("problems", []))

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    add("targets:")
    add(
        f"  {verdict((sim_rate or 0) >= args.rate * 0.95)} offered load >= {args.rate} trades/s"
        f" (-5 %): simulator {fmt_rate(sim_rate)}, into Kafka {fmt_rate(rates[TRADES])}"
    )
    add(
        f"  {verdict(p99_out is not None and p99_out <= 15)} freshness p99 <= 15 s outside"
        f" fault windows: {fmt_s(p99_out)}"
    )
    add(
        f"  {verdict(rec_ok)} recovery <= {args.recovery_s:g} s per fault: "
        + ", ".join(
            f"{f.name} {fmt_s(f.recovered - (f.ended or f.started)) if f.recovered else 'never'}"
            for f in soak.faults
            if f.started
        )
    )
    more = " ..." if len(violations) > 6 else ""
    add(
        f"  {verdict(idle_ok)} no drain idle > 10 s with lag outside fault windows:"
        f" {len(violations)} stretches"
        + (f" ({'; '.join(violations[:6])}{more})" if violations else "")
    )
    problems = final.get("problems")
    add(
        f"  {verdict(not problems)} exact end state"
        + (f": {len(problems)} problem(s)" if problems else "")
    )
    add("=" * 100)
    print("\n".join(L), flush=True)
    notes(soak, runs, end)
    if "error" in final:
        print(final["error"])


def fmt_rate(r: float | None) -> str:
    return "?" if r is None else f"{r:,.0f}/s"


def notes(soak: Soak, runs: dict[str, list[dict[str, Any]]], end: float) -> None:
    """Evidence after the numbers: what each fault did, runs that did not complete."""
    print("details:")
    by_id = {r["id"]: (n, r) for n, rows in runs.items() for r in rows}

    def history(r: dict[str, Any]) -> str:
        return " -> ".join(f"{n}@{CLOCK.stamp(t)}" for n, t, _ in r["states"])

    for f in soak.faults:
        for n in f.notes:
            print(f"  {f.name}: {n}")
        if f.target_run is not None and f.target_run in by_id:
            n, r = by_id[f.target_run]
            print(
                f"  {f.name}: the drain run it hit, {n.split('/')[0]} {r['name']}: {history(r)};"
                f" {r['message'][:200]}"
            )
    for e in soak.events:
        print(f"  event: {e}")
    for name, rows in runs.items():
        limited = [r for r in rows if "concurrency limit" in r["message"]]
        if limited:
            late = sum(1 for r in limited if r["before"])
            print(
                f"  {name.split('/')[0]}: {len(limited)} runs Cancelled 'Deployment concurrency"
                f" limit reached' (one at a time, CANCEL_NEW; {late} due before the start)"
            )
        for r in rows:
            if r in limited:
                continue
            if r["final"] != "Completed" and (r["expected"] or 0) <= end:
                kind = "scheduled" if r["auto"] else "manual"
                due = CLOCK.stamp(r["expected"]) if r["expected"] else "?"
                print(
                    f"  {name.split('/')[0]} {r['name']} ({kind}, due {due}): {history(r)};"
                    f" {r['message'][:200]}"
                )
    for name, rows in runs.items():
        done = [r for r in rows if "longest_wait_s" in r] if name in CONSUMERS else []
        if done:
            firsts = [r["first_write_s"] for r in done if r.get("first_write_s") is not None]
            records = [r.get("records") or 0 for r in done]
            print(
                f"  {name.split('/')[0]}: {len(done)} run summaries; first write p50"
                f" {fmt_s(pct(firsts, 50))} max {fmt_s(max(firsts) if firsts else None)};"
                f" records per run p50 {pct(records, 50)}"
            )
    if soak.final.get("cancel"):
        print(f"  cancel: {soak.final['cancel']}")
    for name, text in soak.final.get("drains", {}).items():
        print(f"  final {name}: {text}")
    for p in (soak.store, soak.kafka, soak.runs, soak.reaper):
        if p is not None and p.errors:
            print(f"  {p.name} errors (gaps in its series): {dict(p.errors)}")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0, help="load duration (at least)")
    p.add_argument(
        "--rate", type=int, default=1000, help="simulator trades/s in total over the 4 symbols"
    )
    p.add_argument(
        "--faults", default="all", help=f"comma list of {', '.join(FAULT_ORDER)}, worker, all, none"
    )
    p.add_argument("--worker-kill", choices=("drain", "worker", "tree"), default="drain")
    p.add_argument(
        "--lead", type=float, default=45.0, help="seconds of load before the first fault"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=150.0,
        help="load kept at least this long after the last fault ends (to see it recover)",
    )
    p.add_argument(
        "--min-gap",
        type=float,
        default=45.0,
        help="at least this long between one fault's end and the next",
    )
    p.add_argument("--kafka-down", type=float, default=20.0)
    p.add_argument("--prefect-down", type=float, default=120.0)
    p.add_argument(
        "--pg-down", type=float, default=0.0, help="seconds between PostgreSQL's stop and start"
    )
    p.add_argument(
        "--worker-down",
        type=float,
        default=5.0,
        help="seconds before the killed worker is started again",
    )
    p.add_argument(
        "--mid-batch-s",
        type=float,
        default=3.0,
        help="kill this long after a drain run turned Running",
    )
    p.add_argument(
        "--fault-wait",
        type=float,
        default=150.0,
        help="longest wait for a drain run in the wanted state",
    )
    p.add_argument("--fresh-s", type=float, default=15.0)
    p.add_argument("--recovery-s", type=float, default=120.0)
    p.add_argument("--sample-every", type=int, default=10, help="freshness: 1 in N trade ids")
    p.add_argument(
        "--ready-minutes", type=float, default=5.0, help="wait this long for trades to flow"
    )
    p.add_argument(
        "--setup-minutes", type=float, default=10.0, help="retry a busy Prefect server this long"
    )
    p.add_argument(
        "--final-minutes", type=float, default=10.0, help="longest wait for the final drains"
    )
    p.add_argument("--every", type=float, default=30.0, help="seconds between summary lines")
    p.add_argument(
        "--wait-minutes",
        type=float,
        default=30.0,
        help="how long to wait for another run's side processes",
    )
    args = p.parse_args(argv)
    chosen: list[str] = []
    for item in (x.strip() for x in args.faults.split(",") if x.strip()):
        names = ALIASES.get(item, (item,))
        for n in names:
            if n not in FAULT_ORDER:
                p.error(f"unknown fault {n!r}; known: {', '.join(FAULT_ORDER)}, worker, all, none")
            chosen.append(n)
    args.fault_list = [f for f in FAULT_ORDER if f in chosen]
    return args


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = config.load().with_overrides(simulator_rate=args.rate)
    from blocks import prefect_api

    with prefect_api(settings):  # this process, its threads and child processes
        soak = Soak(args, settings)
        atexit.register(soak.undo)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            ok = soak.setup()
        except KeyboardInterrupt:
            say("interrupted during set-up")
            ok = False
        except Exception as e:
            say(f"could not set the platform up: {type(e).__name__}: {e}")
            traceback.print_exc()
            ok = False
        if not ok:
            soak.undo()
            for p in (soak.store, soak.kafka, soak.runs, soak.reaper):
                if p is not None:
                    p.stop()
            for side in reversed(soak.sides):
                soak.stop_side(side)
            return 2
        try:
            soak.run()
        except KeyboardInterrupt:
            say("interrupted: stopping the load, reporting what was measured")
            soak.t_load_end = time.time()
        finally:
            soak.undo()
        try:
            soak.finish()
        except Exception as e:
            say(f"finishing failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            for side in reversed(soak.sides):
                soak.stop_side(side)
        report(soak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
