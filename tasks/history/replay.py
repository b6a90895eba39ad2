"""Re-drain a topic from a point in time: the work behind ``replay_topic``.

A replay is the ordinary price drain (``tasks.drain.loop.drain`` with ``PostgresSink``: the
same decoding, DLQ, idempotent writes and offsets stored with each batch) under a
consumer name of its own, whose stored offsets are seeded with the first offset at or
after the start time in each partition (Kafka's ``offsets_for_times``, on the record
timestamps the producer set). The live drains' offsets are never touched, and rows
already present are skipped by their natural keys, so replaying more than was lost
changes nothing.

The consumer name is derived from the topic and start time, so a replay that crashed
or ran out of its time budget continues from where it stopped when run again with the
same arguments; ``restart`` seeds it afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka import TopicPartition

from tasks.core import config
from tasks.core.kafka import consumer


@dataclass(frozen=True)
class Span:
    """Per partition: the first offset to replay and the log end when the replay began."""

    topic: str
    start: dict[int, int]
    end: dict[int, int]

    @property
    def total(self) -> int:
        return sum(max(0, self.end[p] - self.start[p]) for p in self.start)

    def done(self, stored: dict[int, int]) -> int:
        """Records replayed given the stored next offsets per partition."""
        return sum(max(0, min(stored.get(p, s), self.end[p]) - s) for p, s in self.start.items())


def consumer_name(topic: str, from_us: int) -> str:
    return f"replay.{topic}.{from_us}"


def span(settings: config.Settings, topic: str, from_us: int) -> Span:
    """Where a replay of ``topic`` from ``from_us`` starts and (for progress) ends."""
    c = consumer(None, settings)
    try:
        parts = sorted(c.partitions_for_topic(topic) or ())
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in parts]
        ends = c.end_offsets(tps)
        found = c.offsets_for_times({tp: from_us // 1000 for tp in tps})
        start = {tp.partition: found[tp].offset if found[tp] else ends[tp] for tp in tps}
        return Span(topic, start, {tp.partition: ends[tp] for tp in tps})
    finally:
        c.close()


def seed(conn, name: str, s: Span, restart: bool = False) -> bool:
    """Store the replay's start offsets for ``name``; False when offsets are stored
    already (a previous run of this replay: it continues) and ``restart`` is off."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM kafka_offsets WHERE consumer = %s AND topic = %s",
            (name, s.topic),
        )
        if cur.fetchone()[0] and not restart:
            return False
        cur.executemany(
            """INSERT INTO kafka_offsets (consumer, topic, partition, next_offset)
               VALUES (%s, %s, %s, %s) ON CONFLICT (consumer, topic, partition)
               DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()""",
            [(name, s.topic, p, o) for p, o in s.start.items()],
        )
        return True


def stored(conn, name: str, topic: str) -> dict[int, int]:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT partition, next_offset FROM kafka_offsets WHERE consumer = %s AND topic = %s",
            (name, topic),
        )
        return dict(cur.fetchall())
