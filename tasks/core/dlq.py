"""Dead-letter records: bad input is kept with its reason, never dropped or fatal.

One record per rejected payload on ``tapeline.dlq``, keyed by source (e.g.
``ingest.binance``, ``drain.prices``). The raw payload is kept verbatim as text when it
is UTF-8, else base64, so an operator can replay or inspect exactly what arrived.

The guarantee: a record always fits, whatever was rejected. Its value is at most
``MAX_RECORD_BYTES`` (256 KiB, a quarter of Kafka's default 1 MiB ``message.max.bytes``
and of kafka-python's ``max_request_size``), because every part of it is bounded:

- ``raw``: the first ``MAX_RAW_BYTES`` (64 KiB) of the payload, cut at a character
  boundary when it is text; base64 whenever escaping the text for JSON (records are
  ASCII) would more than triple it (only control characters do), so at most 192 KiB.
  ``raw_length`` (bytes) and ``raw_sha256`` (hex) always describe the *whole* payload,
  and ``raw_truncated`` says whether ``raw`` is all of it. A ``str`` payload is its
  UTF-8 bytes (lone surrogates kept with ``surrogatepass``, so they come back as base64).
- ``reason``: the first ``MAX_REASON_CHARS`` (2,048) characters, "..." marking a cut.
- ``source``: at most ``MAX_SOURCE_CHARS``; ``context`` (the caller's topic, offset,
  run id...): at most ``MAX_CONTEXT_BYTES`` of JSON, else kept as a truncated string.

``parse`` reads records written before these fields existed as well: it fills in
``raw_length``, ``raw_sha256`` and ``raw_truncated`` from the (then always whole) payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

from tasks.core.metrics import DLQ_RECORDS
from tasks.core.topics import DLQ

MAX_RAW_BYTES = 64 * 1024  # a venue frame or a Kafka message is far smaller when sane
MAX_REASON_CHARS = 2048  # codec reasons quote at most 60 characters of a value
MAX_SOURCE_CHARS = 256  # sources are names like ingest.binance (the record's key too)
MAX_CONTEXT_BYTES = 4096  # topic, partition, offset, run id, shard: well under 1 KiB
# The bound of a whole record: raw (192 KiB written at most) + reason (2,048 characters,
# at most 12 bytes each when JSON-escaped: 24 KiB) + source (3 KiB) + context (4 KiB)
# + the fixed fields (< 1 KiB): under 224 KiB.
MAX_RECORD_BYTES = 256 * 1024


def _payload(raw: bytes | str) -> tuple[bytes, str, str]:
    """(the payload's bytes, what ``raw`` keeps of it, as text or base64, its encoding)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    kept = data[:MAX_RAW_BYTES]
    try:
        text = kept.decode("utf-8")
    except UnicodeDecodeError as e:
        # a cut inside the last character is still text: keep the whole characters
        text = None
        cut_char = e.reason == "unexpected end of data" and e.start >= len(kept) - 3
        if cut_char and len(kept) < len(data):
            kept = kept[: e.start]
            text = kept.decode("utf-8")
    if text is not None and len(json.dumps(text)) <= 3 * len(kept) + 2:
        return data, text, "utf-8"
    return data, base64.b64encode(kept).decode(), "base64"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _context(context: dict[str, Any]) -> Any:
    text = json.dumps(context, separators=(",", ":"), default=str)
    if len(text) <= MAX_CONTEXT_BYTES:
        return context
    return {"truncated": _cut(text, MAX_CONTEXT_BYTES // 2)}  # ASCII JSON: <= 2 bytes each


def record(source: str, reason: str, raw: bytes | str, **context: Any) -> bytes:
    """The DLQ message value for one rejected payload (at most ``MAX_RECORD_BYTES``)."""
    data, payload, encoding = _payload(raw)
    doc = {
        "source": _cut(str(source), MAX_SOURCE_CHARS),
        "reason": _cut(str(reason), MAX_REASON_CHARS),
        "raw": payload,
        "raw_encoding": encoding,
        "raw_length": len(data),
        "raw_sha256": hashlib.sha256(data).hexdigest(),
        "raw_truncated": len(data) > MAX_RAW_BYTES,
        "time_us": time.time_ns() // 1000,
        "context": _context(context),
    }
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def send(producer: Any, source: str, reason: str, raw: bytes | str, **context: Any):
    """Queue one DLQ record; returns the send future so callers can wait for the ack."""
    DLQ_RECORDS.labels(source=source).inc()
    key = _cut(source, MAX_SOURCE_CHARS).encode()
    return producer.send(DLQ, key=key, value=record(source, reason, raw, **context))


def parse(value: bytes) -> dict[str, Any]:
    """A DLQ record back as a dict, with ``raw`` restored to bytes (the kept prefix when
    ``raw_truncated``; ``raw_length`` and ``raw_sha256`` are of the whole payload)."""
    doc = json.loads(value)
    raw = doc["raw"]
    if doc["raw_encoding"] == "base64":
        doc["raw"] = base64.b64decode(raw)
    else:
        doc["raw"] = raw.encode("utf-8", "surrogatepass")  # old records kept str payloads as is
    if "raw_length" not in doc:  # written before payloads were bounded: raw is all of it
        doc["raw_length"] = len(doc["raw"])
        doc["raw_sha256"] = hashlib.sha256(doc["raw"]).hexdigest()
        doc["raw_truncated"] = False
    return doc
