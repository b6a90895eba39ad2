"""Sinks: where drained batches are stored, each with its own exactly-once mechanism."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

_FAULT = os.environ.get("TAPELINE_DRAIN_FAULT", "")
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
