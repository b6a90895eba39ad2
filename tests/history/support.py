"""What the history tests share: a price drain running beside the flow under test."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.drain.loop import drain
from tasks.drain.postgres import PostgresSink


@contextmanager
def drain_running(settings, schema: str, topic: str, name: str | None = None) -> Iterator[None]:
    """The price drain on ``topic`` in the background, as the scheduled one would run
    (a failed run is simply followed by the next, as Prefect's retries would). Give the
    same ``name`` to continue where an earlier one stopped; a new name reads from the
    start of the topic."""
    stop = threading.Event()
    name = name or f"test-drain-{uuid.uuid4().hex[:6]}"

    def loop() -> None:
        while not stop.is_set():
            sink = PostgresSink(settings.pg_dsn, schema)
            try:
                drain(sink, name, [topic], dlq_source="test", settings=settings, max_seconds=3)
            except Exception as e:  # reported; the next run follows
                print(f"drain run failed, running it again: {e!r}", file=sys.stderr)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(30)
