"""A private Kafka broker for tests that stop, kill or reconfigure one: its own ports and
TAPELINE_HOME (as tests/test_stack.py does), so nothing else is disturbed; killed and
purged afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator

from stack.process import alive, read_pid
from stack.services import Kafka, up
from tasks.core import config


def kill(broker: Kafka, node: int | None = None) -> None:
    """SIGKILL the process group of one node (its id), or of every node: an outage, not a
    polite shutdown."""
    for n in broker.nodes if node is None else [broker.node(node)]:
        pid = read_pid(n.pidfile)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        n.pidfile.unlink(missing_ok=True)


@contextlib.contextmanager
def private_broker(
    shared: config.Settings, port: int, properties: dict[str, str] | None = None, **env: str
) -> Iterator[tuple[dict[str, str], config.Settings, Kafka]]:
    """A running broker on ``port`` with ``env`` on top of this session's settings (the
    shared PostgreSQL's roles included: their local passwords live with its home), and
    ``properties`` added to its server.properties."""
    home = shared.home / f"test-broker-{uuid.uuid4().hex[:8]}"
    full = {
        **os.environ,
        "TAPELINE_HOME": str(home),
        "TAPELINE_PG_DSN": shared.pg_dsn,
        "TAPELINE_PG_WRITER_DSN": shared.pg_writer_dsn,
        "TAPELINE_PG_READER_DSN": shared.pg_reader_dsn,
        "TAPELINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        **env,
    }
    s = config.load(full)
    broker = Kafka("kafka", s)
    broker.overrides = properties or {}
    try:
        up([broker])  # healthy() is a produce and read-back with these settings
        yield full, s, broker
    finally:
        kill(broker)
        shutil.rmtree(home, ignore_errors=True)
