"""The batch-consume loop both drains share: Kafka -> decode -> sink -> offsets.

Delivery guarantee: a sink stores each batch together with (PostgreSQL) or guarded by
(MongoDB) the Kafka offsets it came from, so the database, not Kafka, knows what is
done. On assignment the loop seeks to the offsets the sink stored, falling back to the
group's committed offsets, then to the earliest. Kafka's committed offsets are written
only after the sink's write is durable: they show lag and seed a fresh database.

Concurrency: drains join the consumer group named after the consumer, so two drains
started at once split the partitions. A batch in flight when its partitions move lands
on its own; whoever then writes a partition from stale offsets is stopped by the sink's
fence (PostgreSQL) or guards (MongoDB).

Throughput: decoding batch N+1 overlaps writing batch N (one writer thread, so writes
stay in order); at most two batches are in memory. Bad records go to the DLQ (acked
before the offsets that pass them are stored) and never stop the drain.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from tasks.core import config, dlq, kafka
from tasks.core.metrics import (
    CONSUMER_LAG,
    DRAIN_BATCH_SECONDS,
    DRAIN_DUPLICATES,
    DRAIN_LAST_SUCCESS,
    DRAIN_REJECTS,
    DRAIN_ROWS,
    FRESHNESS,
)
from tasks.drain.contract import Batch, Fenced, Key, Sink, Written, crash_point

log = logging.getLogger(__name__)


@dataclass
class DrainResult:
    """What one drain did; ``stopped`` says why it ended."""

    consumer: str
    sink: str
    records: dict[str, int] = field(default_factory=dict)  # topic -> records read
    rejects: dict[str, int] = field(default_factory=dict)  # topic -> sent to the DLQ
    written: Written = field(default_factory=Written)
    lag: dict[Key, int] = field(default_factory=dict)  # partition -> records left
    batch_seconds: list[float] = field(default_factory=list)
    fenced: int = 0
    seconds: float = 0.0
    stopped: str = ""

    def lag_by_topic(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (topic, _), n in self.lag.items():
            out[topic] += n
        return dict(out)


class _Run(ConsumerRebalanceListener):
    """State of one drain; also the rebalance listener (called inside ``poll``)."""

    def __init__(
        self, sink: Sink, name: str, topics: list[str], settings, dlq_source: str, batch_size: int
    ):
        self.sink, self.name, self.topics, self.dlq_source = sink, name, topics, dlq_source
        # A drain that died is evicted after 6 s (the broker's minimum), not the default
        # 45 s, so its retry gets the partitions back soon; heartbeats run on their own
        # thread, so a slow batch does not count against it. One poll may fill a batch.
        self.consumer = kafka.consumer(
            name,
            settings,
            session_timeout_ms=6_000,
            heartbeat_interval_ms=1_000,
            max_poll_records=batch_size,
        )
        self.settings = settings
        self.result = DrainResult(name, sink.name)
        self.expected: dict[Key, int | None] = {}  # what the sink holds before our next batch
        self.ends: dict[TopicPartition, int] = {}  # log ends seen when assigned
        self._need_ends: set[TopicPartition] = set()
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        self.joined = False
        self.resync = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"drain-{sink.name}")
        self._inflight: tuple[Future, dict[Key, tuple[int | None, int]]] | None = None
        self._producer: Any = None

    # -- rebalance: called on kafka-python's IO thread, which must neither call Kafka nor
    # wait long (blocking it stalls the group's join): a batch still being written lands
    # on its own, and the fence (or the MongoDB guards) stops anyone writing it twice.
    def on_partitions_revoked(self, revoked) -> None:
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.joined = True
        self._seek_stored(list(assigned))
        self._need_ends.update(assigned)

    def _seek_stored(self, tps: list[TopicPartition]) -> None:
        """Seek to the sink's offsets; a partition with a write in flight goes on after it."""
        stored = self.sink.stored_offsets(self.name, self.topics)
        inflight = self._inflight[1] if self._inflight is not None else {}
        for tp in tps:
            key = (tp.topic, tp.partition)
            if key in inflight:
                stored[key] = inflight[key][1]
            self.expected[key] = stored.get(key)
            if key in stored:
                self.consumer.seek(tp, stored[key])

    # -- writes -----------------------------------------------------------------------
    def submit(self, batch: Batch, offsets: dict[Key, tuple[int | None, int]]) -> None:
        def work() -> tuple[Written, float]:
            t0 = time.perf_counter()
            written = self.sink.write(self.name, batch, offsets)
            return written, time.perf_counter() - t0

        self._inflight = (self._writer.submit(work), offsets)

    def _finish_write(self) -> None:
        """Wait for the in-flight write and account for it (no Kafka calls)."""
        if self._inflight is None:
            return
        future, offsets = self._inflight
        self._inflight = None
        try:
            written, seconds = future.result()
        except Fenced as e:
            log.warning("%s: %s; re-reading stored offsets", self.name, e)
            self.result.fenced += 1
            self.resync = True
            return
        crash_point("after_db_commit")
        self.result.written.add(written)
        self.result.batch_seconds.append(seconds)
        for (t, p), (_, nxt) in offsets.items():
            self._to_commit[TopicPartition(t, p)] = OffsetAndMetadata(nxt, "", -1)

    def settle(self) -> None:
        """Finish the in-flight write, then show its offsets in Kafka (lag display)."""
        self._finish_write()
        assigned = self.consumer.assignment()
        commit = {tp: om for tp, om in self._to_commit.items() if tp in assigned}
        self._to_commit.clear()
        if not commit:
            return
        try:
            self.consumer.commit(commit)
        except KafkaError as e:  # e.g. a rebalance in progress: the sink's offsets rule
            log.warning("%s: Kafka offset commit failed (lag display only): %s", self.name, e)

    def reject(self, topic: str, partition: int, rec: Any, reason: str) -> Future:
        if self._producer is None:
            self._producer = kafka.producer(self.settings)
        self.result.rejects[topic] = self.result.rejects.get(topic, 0) + 1
        return dlq.send(
            self._producer,
            self.dlq_source,
            reason,
            rec.value if rec.value is not None else b"",
            topic=topic,
            partition=partition,
            offset=rec.offset,
            consumer=self.name,
        )

    # -- reading ----------------------------------------------------------------------
    def poll(self, limit: int, poll_ms: int) -> dict[TopicPartition, list]:
        """Up to ``limit`` records: polls until the batch is full or Kafka has no more."""
        out: dict[TopicPartition, list] = {}
        n = 0
        while n < limit:
            got = self.consumer.poll(timeout_ms=poll_ms if n == 0 else 0, max_records=limit - n)
            if not got:
                break
            for tp, recs in got.items():
                out.setdefault(tp, []).extend(recs)
                n += len(recs)
        return out

    def caught_up(self) -> bool:
        if self._need_ends:
            self.ends.update(self.consumer.end_offsets(list(self._need_ends)))
            self._need_ends.clear()
        assigned = self.consumer.assignment()
        return all(self.consumer.position(tp) >= self.ends.get(tp, 0) for tp in assigned)

    def lag(self) -> dict[Key, int]:
        c = self.consumer
        tps = [TopicPartition(t, p) for t in self.topics for p in c.partitions_for_topic(t) or ()]
        ends = c.end_offsets(tps)
        stored = self.sink.stored_offsets(self.name, self.topics)
        out = {}
        for tp in tps:
            key = (tp.topic, tp.partition)
            pos = stored.get(key)
            if pos is None:
                committed = c.committed(tp)
                pos = committed if committed is not None else c.beginning_offsets([tp])[tp]
            out[key] = max(0, ends[tp] - pos)
        return out

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._producer is not None:
            self._producer.close(timeout=10)
        self.consumer.close()
        self.sink.close()


def drain(
    sink: Sink,
    consumer: str,
    topics: list[str],
    *,
    dlq_source: str,
    settings: config.Settings | None = None,
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 20_000,
    poll_ms: int = 1_000,
) -> DrainResult:
    """Drain ``topics`` into ``sink`` until caught up or a budget is spent."""
    settings = settings or config.load()
    t0 = time.monotonic()
    run = _Run(sink, consumer, topics, settings, dlq_source, batch_size)
    res = run.result
    try:
        for topic in topics:  # known partitions before joining, or the first assignment is empty
            if not run.consumer.partitions_for_topic(topic):
                raise ValueError(f"topic {topic!r} does not exist")
        run.consumer.subscribe(topics, listener=run)
        while True:
            if time.monotonic() - t0 >= max_seconds:
                res.stopped = "time budget"
                break
            read = sum(res.records.values())
            if max_records is not None and read >= max_records:
                res.stopped = "record budget"
                break
            limit = batch_size if max_records is None else min(batch_size, max_records - read)
            polled = run.poll(limit, poll_ms)
            if not polled:
                run.settle()
                if run.resync:
                    run.resync = False
                    run._seek_stored(list(run.consumer.assignment()))
                    continue
                if run.joined and run.caught_up():
                    res.stopped = "caught up"
                    break
                continue
            batch = sink.open_batch()
            offsets: dict[Key, tuple[int | None, int]] = {}
            acks = []
            for tp, recs in polled.items():
                key = (tp.topic, tp.partition)
                res.records[tp.topic] = res.records.get(tp.topic, 0) + len(recs)
                for rec, reason in batch.add(tp.topic, tp.partition, recs):
                    acks.append(run.reject(tp.topic, tp.partition, rec, reason))
                offsets[key] = (run.expected.get(key), recs[-1].offset + 1)
            for ack in acks:  # a reject is on the DLQ before any offset passes it
                ack.get(timeout=30)
            run.settle()
            if run.resync:  # the previous batch was fenced: this one starts from stale offsets
                run.resync = False
                run._seek_stored(list(run.consumer.assignment()))
                continue
            for key, (_, nxt) in offsets.items():
                run.expected[key] = nxt
            run.submit(batch, offsets)
        run.settle()
        res.lag = run.lag()
    finally:
        res.seconds = time.monotonic() - t0
        run.close()
    return res


def record_metrics(flow_name: str, result: DrainResult) -> None:
    """Every drain metric, from one result (the one place that sets them)."""
    sink = result.sink
    for table, n in result.written.rows.items():
        DRAIN_ROWS.labels(sink=sink, table=table).inc(n)
    for table, n in result.written.duplicates.items():
        DRAIN_DUPLICATES.labels(sink=sink, table=table).inc(n)
    for topic, n in result.rejects.items():
        DRAIN_REJECTS.labels(sink=sink, topic=topic).inc(n)
    for seconds in result.batch_seconds:
        DRAIN_BATCH_SECONDS.labels(sink=sink).observe(seconds)
    for (topic, partition), n in result.lag.items():
        CONSUMER_LAG.labels(group=result.consumer, topic=topic, partition=str(partition)).set(n)
    now_us = time.time_ns() // 1000
    for (venue, symbol), newest in result.written.newest_us.items():
        FRESHNESS.labels(venue=venue, symbol=symbol).set((now_us - newest) / 1e6)
    DRAIN_LAST_SUCCESS.labels(flow=flow_name).set(time.time())
