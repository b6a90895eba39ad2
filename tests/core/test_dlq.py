"""DLQ records are bounded whatever was rejected, describe the whole payload, and travel
through the real broker."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.errors import MessageSizeTooLargeError

from tasks.core import dlq
from tasks.core.kafka import producer
from tasks.core.topics import DLQ
from tests.ingest.support import end_offsets, read_topic

MiB = 1024 * 1024
BROKER_MAX = MiB  # Kafka's default message.max.bytes; kafka-python's max_request_size


def _data(raw: bytes | str) -> bytes:
    return raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw


def assert_describes(value: bytes, raw: bytes | str, reason: str) -> dict:
    """``value`` is a bounded record whose fields describe ``raw`` and ``reason``."""
    assert len(value) <= dlq.MAX_RECORD_BYTES < BROKER_MAX
    data = _data(raw)
    doc = dlq.parse(value)
    assert doc["raw_length"] == len(data)
    assert doc["raw_sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["raw_truncated"] is (len(data) > dlq.MAX_RAW_BYTES)
    assert data.startswith(doc["raw"])
    if doc["raw_truncated"]:
        assert dlq.MAX_RAW_BYTES - 3 <= len(doc["raw"]) <= dlq.MAX_RAW_BYTES
    else:
        assert doc["raw"] == data
    if len(reason) <= dlq.MAX_REASON_CHARS:
        assert doc["reason"] == reason
    else:
        assert len(doc["reason"]) == dlq.MAX_REASON_CHARS
        assert doc["reason"] == reason[: dlq.MAX_REASON_CHARS - 3] + "..."
    return doc


FIVE_MB_JSON = json.dumps({"stream": "btcusdt@trade", "data": "x" * 5_000_000}).encode()
NOT_UTF8 = b"\xff\xfe" + os.urandom(300_000)
HUGE_REASON = "price: not a number: " + "9" * 5_000_000


@pytest.mark.parametrize(
    ("raw", "reason", "encoding"),
    [
        (FIVE_MB_JSON, "not JSON", "utf-8"),
        (NOT_UTF8, "not JSON: 'utf-8' codec can't decode", "base64"),
        (b'{"v":1,"t":"trade"}', HUGE_REASON, "utf-8"),
        (FIVE_MB_JSON.decode(), HUGE_REASON, "utf-8"),  # a str payload is its UTF-8 bytes
    ],
    ids=["5MB-payload", "not-utf8", "huge-reason", "5MB-str-and-huge-reason"],
)
def test_a_record_is_bounded_and_describes_the_whole_payload(raw, reason, encoding):
    value = dlq.record("drain.prices", reason, raw, topic="market.trades.raw", offset=7)
    doc = assert_describes(value, raw, reason)
    assert doc["raw_encoding"] == encoding
    assert doc["source"] == "drain.prices"
    assert doc["context"] == {"topic": "market.trades.raw", "offset": 7}


def test_the_worst_payload_and_reason_still_fit():
    """Escaping inflates text: 2-byte characters triple as \\u00e9, astral ones take 12
    bytes each in the reason. The record stays under its bound."""
    raw = ("é" * MiB).encode()
    reason = "\U0001f4a5" * 10_000
    value = dlq.record("s" * 10_000, reason, raw, **{f"k{i}": "v" * 100 for i in range(500)})
    doc = assert_describes(value, raw, reason)
    assert doc["raw_encoding"] == "utf-8" and len(doc["raw"]) == dlq.MAX_RAW_BYTES
    assert len(doc["source"]) == dlq.MAX_SOURCE_CHARS
    assert set(doc["context"]) == {"truncated"}
    assert 200 * 1024 < len(value) <= dlq.MAX_RECORD_BYTES  # the bound is close, and holds


def test_control_characters_are_kept_as_base64_not_inflated_six_times():
    raw = b"\x01" * 100_000  # valid UTF-8, but each byte would be written as \u0001
    value = dlq.record("ingest.binance", "not JSON", raw)
    doc = assert_describes(value, raw, "not JSON")
    assert doc["raw_encoding"] == "base64" and len(value) < 90 * 1024


def test_a_cut_inside_a_character_keeps_the_whole_characters_as_text():
    raw = b"ab" + "€".encode() * 30_000  # 3-byte characters: 64 KiB falls inside one
    doc = assert_describes(dlq.record("x", "r", raw), raw, "r")
    assert doc["raw_encoding"] == "utf-8" and len(doc["raw"]) == dlq.MAX_RAW_BYTES - 2
    doc["raw"].decode("utf-8")  # whole characters only


def test_a_str_payload_with_a_lone_surrogate_round_trips():
    raw = "bad \ud800 frame"
    doc = assert_describes(dlq.record("ingest.kraken", "r", raw), raw, "r")
    assert doc["raw_encoding"] == "base64"
    assert doc["raw"].decode("utf-8", "surrogatepass") == raw


def test_records_written_before_the_bound_still_parse():
    old_text = json.dumps({
        "source": "ingest.binance", "reason": "not JSON", "raw": "{oops",
        "raw_encoding": "utf-8", "time_us": 1, "context": {"run": "r1"},
    }).encode()  # fmt: skip
    old_b64 = json.dumps({
        "source": "drain.prices", "reason": "not JSON", "raw": "//4=",
        "raw_encoding": "base64", "time_us": 1, "context": {},
    }).encode()  # fmt: skip
    for value, raw in ((old_text, b"{oops"), (old_b64, b"\xff\xfe")):
        doc = dlq.parse(value)
        assert doc["raw"] == raw and doc["raw_length"] == len(raw)
        assert doc["raw_sha256"] == hashlib.sha256(raw).hexdigest()
        assert doc["raw_truncated"] is False


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2000) | st.text(max_size=2000)
    | st.integers(0, 3).map(lambda n: b"{" * (dlq.MAX_RAW_BYTES - 2 + n))
    | st.integers(0, 4).map(lambda n: "\u00e9" * (dlq.MAX_RAW_BYTES // 2 - 2) + "\u20ac" * n),
    st.text(max_size=50) | st.integers(0, 3).map(lambda n: "r" * (dlq.MAX_REASON_CHARS - 1 + n)),
)  # fmt: skip
def test_any_payload_and_reason_make_a_bounded_record_that_describes_them(raw, reason):
    assert_describes(dlq.record("src", reason, raw, offset=1), raw, reason)


def test_bounded_records_travel_through_the_real_dlq_topic(kafka, new_topic):
    """What the broker could not take before (a 5 MB frame's record) is acked now, and
    reads back from tapeline.dlq describing the original."""
    run = uuid.uuid4().hex
    cases = [
        (FIVE_MB_JSON, "not JSON"),
        (NOT_UTF8, "not JSON: invalid start byte"),
        (b"{}", HUGE_REASON),
        (("é" * MiB).encode(), "\U0001f4a5" * 10_000),  # the largest record there can be
    ]
    start = end_offsets(kafka, DLQ)
    p = producer(kafka)
    try:
        # the unbounded payload itself is refused by the client before it reaches the broker
        with pytest.raises(MessageSizeTooLargeError):
            p.send(new_topic(partitions=1), value=FIVE_MB_JSON).get(timeout=10)
        futures = [
            dlq.send(p, "test.dlq", reason, raw, run=run, case=i)
            for i, (raw, reason) in enumerate(cases)
        ]
        p.flush(timeout=30)
        for f in futures:
            f.get(timeout=10)  # acked by the broker
    finally:
        p.close()
    docs = {}
    for records in read_topic(kafka, DLQ, start).values():
        for r in records:
            doc = dlq.parse(r.value)
            if doc["context"].get("run") == run:
                assert r.key == b"test.dlq"
                docs[doc["context"]["case"]] = (r.value, doc)
    assert sorted(docs) == list(range(len(cases)))
    for i, (raw, reason) in enumerate(cases):
        value, doc = docs[i]
        assert_describes(value, raw, reason)
        assert doc["source"] == "test.dlq"
