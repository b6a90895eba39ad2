"""The sink contract: what a drain needs of a store, and the guarantee every sink keeps.

A sink stores each batch together with (PostgreSQL: the same transaction) or guarded by
(MongoDB: per-partition offsets on every effect) the Kafka offsets it came from, so the
database, not Kafka, knows what is done. Hence:

- ``write`` applies a batch at most once in effect, however often it is retried or
  replayed, and records the next offset of every partition in the batch;
- ``stored_offsets`` is where a drain resumes; Kafka's committed offsets only show lag;
- a stale writer never double-applies: PostgreSQL fences it (a writer whose ``expected``
  offsets no longer match what is stored raises ``Fenced`` and writes nothing); MongoDB
  guards each effect with the offset it came from, so a stale batch re-applies nothing.
- a record the store refuses as data (not as a connection problem: a value out of range,
  a row too large to index, arithmetic that cannot be exact) makes ``write`` raise
  ``Rejected`` naming those records and their reasons, having written nothing that a
  rewrite without them does not make whole; the loop
  dead-letters them (acknowledged before any offset passes them) and writes the rest, so
  one poison record never stops its partition;
- a following run (``follow``: reads until a newer run takes over, the scheduled drains'
  handover) records its generation with ``take_over``; an older run that sees a newer
  ``generation`` finishes its write and stops. Only liveness rides on it;
- the stored offsets of a topic belong to one log (cluster id and topic id): ``claim_log``
  records it, so offsets of a recreated topic or another cluster are never applied to
  the new one silently.

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


class Rejected(Exception):
    """The store refused these records as data; nothing of the batch was written.
    ``records``: ``(record, reason)`` pairs, the records as the batch received them."""

    def __init__(self, records: list[tuple[Any, str]]):
        super().__init__(f"{len(records)} record(s) refused: {records[0][1][:200]}")
        self.records = records


@dataclass
class Written:
    """What one batch (or a whole drain) changed, per table."""

    rows: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # read, deliberately not stored
    newest_us: dict[tuple[str, str], int] = field(default_factory=dict)  # (venue, symbol)

    def add(self, other: Written) -> None:
        for mine, theirs in (
            (self.rows, other.rows),
            (self.duplicates, other.duplicates),
            (self.skipped, other.skipped),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for k, v in other.newest_us.items():
            self.newest_us[k] = max(v, self.newest_us.get(k, v))


class Batch(Protocol):
    def __len__(self) -> int: ...

    def add(self, topic: str, partition: int, records: list[Any]) -> list[tuple[Any, str]]:
        """Decode and keep records; returns ``(record, reason)`` for each reject."""
        ...

    def drop(self, records: list[Any]) -> None:
        """Forget these records (the store refused them; they went to the DLQ)."""
        ...


class Sink(Protocol):
    name: str

    def open_batch(self) -> Batch: ...

    def stored_offsets(self, consumer: str, topics: list[str]) -> dict[Key, int]: ...

    def claim_log(self, consumer: str, topic: str, log: str, *, reset: bool = False) -> str | None:
        """Record that ``consumer``'s offsets of ``topic`` belong to ``log`` (cluster id/topic
        id) and return the log recorded before (None: none yet). A different log recorded
        before is kept, unless ``reset``: then the stored offsets of ``topic`` are forgotten
        (an operator's decision after a topic was recreated) and ``log`` is recorded."""
        ...

    def take_over(self, consumer: str) -> int:
        """Make the caller ``consumer``'s newest following run: returns its generation, one
        more than any before. Liveness only: the older run stops when it sees a newer
        generation; exactly-once never depends on it."""
        ...

    def generation(self, consumer: str) -> int:
        """The newest following run's generation (0: none yet); a lost connection raises
        at once (the caller asks again later)."""
        ...

    def write(
        self, consumer: str, batch: Any, offsets: dict[Key, tuple[int | None, int]]
    ) -> Written:
        """Apply ``batch`` once; ``offsets``: partition -> (expected stored, next). Raises
        ``Fenced`` when the stored offsets are not the expected ones, ``Rejected`` when the
        store refuses records as data; either way nothing was written."""
        ...

    def close(self) -> None: ...
