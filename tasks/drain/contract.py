"""The sink contract: what a drain needs of a store, and the guarantee every sink keeps.

A sink stores each batch together with (PostgreSQL: the same transaction) or guarded by
(MongoDB: per-partition offsets on every effect) the Kafka offsets it came from, so the
database, not Kafka, knows what is done. Hence:

- ``write`` applies a batch at most once in effect, however often it is retried or
  replayed, and records the next offset of every partition in the batch;
- ``stored_offsets`` is where a drain resumes; Kafka's committed offsets only show lag;
- a writer whose ``expected`` offsets no longer match what is stored (another drain got
  there first) raises ``Fenced`` and writes nothing, so a stale writer never double-applies.

A new sink implements ``Sink`` and ``Batch`` in one module of ``tasks/drain`` and gets one
flow in ``flows/drain.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from tasks.core import config

_FAULT = config.drain_fault()
Key = tuple[str, int]  # (topic, partition)
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for tests: ``TAPELINE_DRAIN_FAULT=<name>:<n>`` kills the process
    (``os._exit``, no cleanup, like a power cut) the n-th time it passes ``name``."""
    if not _FAULT:
        return
    point, _, nth = _FAULT.partition(":")
    if point == name:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == int(nth or 1):
            os._exit(75)


class Fenced(Exception):
    """Another drain moved this consumer's stored offsets: re-read them, write nothing."""


@dataclass
class Written:
    """What one batch (or a whole drain) changed, per table."""

    rows: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    newest_us: dict[tuple[str, str], int] = field(default_factory=dict)  # (venue, symbol)

    def add(self, other: Written) -> None:
        for mine, theirs in ((self.rows, other.rows), (self.duplicates, other.duplicates)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in other.newest_us.items():
            self.newest_us[k] = max(v, self.newest_us.get(k, v))


class Batch(Protocol):
    def __len__(self) -> int: ...

    def add(self, topic: str, partition: int, records: list[Any]) -> list[tuple[Any, str]]:
        """Decode and keep records; returns ``(record, reason)`` for each reject."""
        ...


class Sink(Protocol):
    name: str

    def open_batch(self) -> Batch: ...

    def stored_offsets(self, consumer: str, topics: list[str]) -> dict[Key, int]: ...

    def write(
        self, consumer: str, batch: Any, offsets: dict[Key, tuple[int | None, int]]
    ) -> Written:
        """Apply ``batch`` once; ``offsets``: partition -> (expected stored, next)."""
        ...

    def close(self) -> None: ...
