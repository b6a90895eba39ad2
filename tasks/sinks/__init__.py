"""Sinks: where drained batches are stored, each with its own exactly-once mechanism."""

from __future__ import annotations

import os

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
