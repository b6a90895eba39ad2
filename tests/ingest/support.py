"""What the ingestion tests read back from Kafka and the simulator, in one place."""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from typing import Any

from kafka import TopicPartition

from tasks.core import codec, config, dlq
from tasks.core.events import Trade
from tasks.core.kafka import consumer
from tasks.core.topics import DLQ
from tasks.venues import simulated

# What trades ingested from the simulator's Binance protocol are named (never `binance`).
SIM_VENUE = simulated("binance")


def read_topic(settings: config.Settings, topic: str, start: dict[int, int] | None = None):
    """Every record of ``topic`` (from ``start`` offsets per partition), per partition in
    offset order."""
    c = consumer(None, settings)
    try:
        parts = sorted(c.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in parts]
        c.assign(tps)
        ends = c.end_offsets(tps)
        for tp in tps:
            c.seek(tp, (start or {}).get(tp.partition, 0))
        out: dict[int, list] = {p: [] for p in parts}
        deadline = time.monotonic() + 120
        while any(c.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"waited 120 s to read {topic} to its end"
            for tp, recs in c.poll(timeout_ms=1000).items():
                out[tp.partition] += [r for r in recs if r.offset < ends[tp]]
        return out
    finally:
        c.close()


def end_offsets(settings: config.Settings, topic: str) -> dict[int, int]:
    c = consumer(None, settings)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def trade_ids(
    settings: config.Settings, topic: str, venue: str = SIM_VENUE
) -> dict[str, list[int]]:
    """Trade ids per symbol in partition order; asserts a symbol never spans partitions
    and that every key is its trade's symbol."""
    ids: dict[str, list[int]] = defaultdict(list)
    home: dict[str, int] = {}
    for partition, records in read_topic(settings, topic).items():
        for r in records:
            t = codec.decode(r.value)
            assert type(t) is Trade and t.venue == venue, t
            assert r.key == t.symbol.encode(), (r.key, t.symbol)
            assert home.setdefault(t.symbol, partition) == partition, f"{t.symbol} in 2 partitions"
            ids[t.symbol].append(t.trade_id)
    return dict(ids)


def dead_letters(settings: config.Settings, start: dict[int, int], run_id: str) -> list[dict]:
    """DLQ records written by one ingestion run since ``start``."""
    out = []
    for records in read_topic(settings, DLQ, start).values():
        for r in records:
            doc = dlq.parse(r.value)
            if doc["context"].get("run") == run_id:
                out.append(doc)
    return out


def assert_contiguous(ids: list[int], symbol: str) -> None:
    """Each id once, in order, no hole."""
    assert ids, f"{symbol}: nothing published"
    holes = [(a, b) for a, b in itertools.pairwise(ids) if b != a + 1]
    assert not holes, f"{symbol}: not contiguous at {holes[:5]} ({len(holes)} places)"


def first_sent(report: dict[str, Any], symbol: str, venue: str = "binance") -> int:
    return report["venues"][venue]["symbols"][symbol]["sent_runs"][0][0]


def last_sent(report: dict[str, Any], symbol: str, venue: str = "binance") -> int:
    return max(last for _, last in report["venues"][venue]["symbols"][symbol]["sent_runs"])


def malformed_delivered(report: dict[str, Any], venue: str = "binance") -> list[str]:
    """Texts of the malformed frames the simulator sent to a connected client."""
    texts = []
    for sym in report["venues"][venue]["symbols"].values():
        for m in sym["malformed"]:
            if m["recipients"]:
                texts += m["texts"]
    return texts


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON report in output: {text[-2000:]}")
