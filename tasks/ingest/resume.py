"""Where ingestion resumes: the last trade per symbol (its id, and its event time, where
gap repair by time starts looking), read back from Kafka itself.

Kafka is the record of what was published, so reading it back survives anything,
SIGKILL included, with no state file to keep in step: a message the broker took but
whose ack never arrived is found, and nothing unacknowledged is. Each symbol's trades
live in one partition (keyed by symbol, default partitioner), so only those partitions
are read, backwards from the end in chunks, until every wanted symbol of this venue has
been seen or ``max_scan`` records were read per partition. A symbol not found within
that window starts fresh: its first live trade sets its position, as on a first run.
"""

from __future__ import annotations

import json
import time

from kafka import TopicPartition
from kafka.partitioner.default import murmur2

from tasks.core import codec, config
from tasks.core.events import Trade
from tasks.core.kafka import consumer


def partition_of(symbol: str, partitions: int) -> int:
    """The partition kafka-python's default partitioner gives ``symbol`` as key."""
    return (murmur2(symbol.encode()) & 0x7FFFFFFF) % partitions


def last_trades(
    settings: config.Settings,
    topic: str,
    venue: str,
    symbols: list[str],
    max_scan: int = 50_000,
    chunk: int = 5_000,
    timeout_s: float = 60.0,
) -> dict[str, Trade]:
    """``{symbol: the trade of venue in topic with the highest id}`` for the symbols found."""
    c = consumer(None, settings)
    found: dict[str, Trade] = {}
    needle = b'"venue":' + json.dumps(venue).encode()
    deadline = time.monotonic() + timeout_s
    try:
        partitions = c.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"topic {topic!r} does not exist")
        wanted: dict[int, set[str]] = {}
        for s in symbols:
            wanted.setdefault(partition_of(s, len(partitions)), set()).add(s)
        for p, missing in sorted(wanted.items()):
            tp = TopicPartition(topic, p)
            c.assign([tp])
            end = c.end_offsets([tp])[tp]
            floor = max(c.beginning_offsets([tp])[tp], end - max_scan)
            pos = end
            while missing and pos > floor:
                start = max(floor, pos - chunk)
                chunk_ids = _read(c, tp, start, pos, venue, needle, missing, deadline)
                found.update(chunk_ids)
                missing -= chunk_ids.keys()
                pos = start
    finally:
        c.close()
    return found


def _read(c, tp, start: int, end: int, venue: str, needle: bytes, symbols: set[str], deadline):
    """The trade with the highest id per wanted symbol among offsets [start, end) of one
    partition."""
    ids: dict[str, Trade] = {}
    c.seek(tp, start)
    while c.position(tp) < end:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading back {tp.topic}[{tp.partition}] took too long")
        for rec in c.poll(timeout_ms=1000).get(tp, []):
            if rec.offset >= end:
                break
            if needle not in rec.value:
                continue
            try:
                event = codec.decode(rec.value)
            except codec.CodecError:
                continue
            if (
                type(event) is Trade
                and event.venue == venue
                and event.symbol in symbols
                and (event.symbol not in ids or event.trade_id > ids[event.symbol].trade_id)
            ):
                ids[event.symbol] = event
    return ids
