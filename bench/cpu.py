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

_TICK = os.sysconf("SC_CLK_TCK")
SELF = 0  # this process, all its threads (time.process_time)


def _stat(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``'s process group (a service started in its own
    session: the broker's JVM, PostgreSQL's server and backends); of this process when
    ``pid`` is ``SELF``; of ``pid`` alone when it leads no group."""
    if pid == SELF:
        return time.process_time()
    total, found = 0, False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields and int(fields[2]) == pid:
            total += int(fields[11]) + int(fields[12])
            found = True
    if not found and (fields := _stat(str(pid))):
        total = int(fields[11]) + int(fields[12])
    return total / _TICK


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
