"""Dead-letter records: bad input is kept with its reason, never dropped or fatal.

One record per rejected payload on ``tapeline.dlq``, keyed by source (e.g.
``ingest.binance``, ``drain.prices``). The raw payload is kept verbatim as text when it
is UTF-8, else base64, so an operator can replay or inspect exactly what arrived.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tasks.core.metrics import DLQ_RECORDS
from tasks.core.topics import DLQ


def record(source: str, reason: str, raw: bytes | str, **context: Any) -> bytes:
    """The DLQ message value for one rejected payload."""
    if isinstance(raw, bytes):
        try:
            payload, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(raw).decode(), "base64"
    else:
        payload, encoding = raw, "utf-8"
    doc = {
        "source": source,
        "reason": reason,
        "raw": payload,
        "raw_encoding": encoding,
        "time_us": time.time_ns() // 1000,
        "context": context,
    }
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def send(producer: Any, source: str, reason: str, raw: bytes | str, **context: Any):
    """Queue one DLQ record; returns the send future so callers can wait for the ack."""
    DLQ_RECORDS.labels(source=source).inc()
    return producer.send(DLQ, key=source.encode(), value=record(source, reason, raw, **context))


def parse(value: bytes) -> dict[str, Any]:
    """A DLQ record back as a dict, with ``raw`` restored to bytes."""
    doc = json.loads(value)
    raw = doc["raw"]
    doc["raw"] = base64.b64decode(raw) if doc["raw_encoding"] == "base64" else raw.encode()
    return doc
