"""CPU seconds of the processes on a benchmark's path, read from /proc.

Why: on a noisy 2-core machine a wall-clock rate swings from run to run, while the CPU
one message costs each process (ingestion, simulator, broker, PostgreSQL) barely moves.
So the benchmarks print CPU microseconds per message for every process next to the raw
client's, and the ratio of the two is what a change is judged by.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stack.process import read_pid
from tasks.core import config

_TICK = os.sysconf("SC_CLK_TCK")
SELF = 0  # this process, all its threads (time.process_time)
MACHINE_ID = -1  # every process on the host: all CPUs' busy time (/proc/stat)


def _stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, CPU ticks of it and of its children it has reaped) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        f = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        out[int(entry)] = (int(f[1]), sum(int(x) for x in f[11:15]))  # utime stime cu cs
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process tree under ``pid`` (a service as the stack
    started it: the broker's JVM, PostgreSQL's server with its backends, including those
    that have exited, whose time their parent has reaped), or of this process, all its
    threads, when ``pid`` is ``SELF``; the whole host's busy CPU time (any process's, on
    all cores) when it is ``MACHINE_ID``."""
    if pid == SELF:
        return time.process_time()
    if pid == MACHINE_ID:  # user nice system idle iowait irq softirq steal: all but idle+iowait
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(f) - f[3] - f[4]) / _TICK
    stats = _stats()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += stats[p][1]
            todo += children.get(p, [])
    return total / _TICK


class Steal:
    """The share of this VM's CPU time its hypervisor gave to others between making this
    and ``stop()`` (/proc/stat "steal"). At 20-40% the busy vCPUs stall for milliseconds
    at a time: latency percentiles and CPU per message move with it, so the benchmarks
    print it beside them."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(f), f[7]

    def stop(self) -> float:
        total, steal = self._read()
        return (steal - self._start[1]) / max(1, total - self._start[0])


def service_pid(settings: config.Settings, name: str) -> int | None:
    """The pid the local stack recorded for service ``name`` (kafka, postgres), if running."""
    return read_pid(settings.home / "run" / f"{name}.pid")


class Meter:
    """CPU seconds each named process spent between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_s(pid) - self._start[name] for name, pid in self.pids.items()}


def per_message_us(spent: dict[str, float], messages: int) -> dict[str, float]:
    """CPU microseconds per message for each process (NaN when nothing was sent)."""
    return {name: (s * 1e6 / messages if messages else float("nan")) for name, s in spent.items()}
