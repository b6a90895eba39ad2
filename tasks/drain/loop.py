"""The batch-consume loop both drains share: Kafka -> decode -> sink -> offsets.

Delivery guarantee (the sink contract, ``tasks.drain.contract``): a sink stores each batch
together with (PostgreSQL) or guarded by (MongoDB) the Kafka offsets it came from, so the
database, not Kafka, knows what is done. The loop starts every assigned partition at the
offset the sink stored, falling back to the consumer's committed Kafka offset (which
seeds a fresh database), then to the log start. Kafka's committed offsets are written
only after the sink's write is durable: they show lag to the exporter.

Assignment, not group membership: a scheduled drain assigns itself its partitions (all
of them, or the ``partitions`` it is given) instead of joining a consumer group. The
database already holds its offsets and fences stale writers, so a group would add only
its rebalances: a run joining every minute could sit in ``RebalanceInProgress`` for most
of its budget while an evicted predecessor timed out. With assignment the first poll
fetches. Two runs given the same partitions are still exactly once (the sink's fence or
guards stop the stale one, which re-reads the stored offsets); runs given disjoint
partition sets drain in parallel.

Offsets that do not fit the log are loud: a stored offset below the log start (records
deleted by retention before they were drained) or beyond the log end fails the run naming
topic, partition and offsets, unless the operator allows gaps, which then skips to the
log start and counts the records skipped. Each topic's stored offsets are bound to its
log (cluster id and topic id), so a recreated topic or another cluster is refused too.

Poison records: a record the codec rejects, or one the store refuses as data
(``Rejected``), goes to the DLQ with its reason (acked before the offsets that pass it
are stored) while the rest of its batch is written; nothing retries forever on the same
data.

Following (the scheduled drains): a run given ``follow`` does not stop when caught up but
keeps reading until its time budget ends or a newer run takes over. Each scheduled run
starts while the one before is still reading, records a newer generation in the sink once
its consumer is positioned (``take_over``), and the older run, checking every second,
finishes its in-flight write and stops ("handed over"). Start-up (a process, imports,
connections: 10-30 s on a loaded machine) thus never leaves the topics unread, and a
scheduler outage shorter than the budget leaves the newest run reading. The newer run's
first write may find offsets the older one moved meanwhile: it is fenced and re-reads
them, as any overlap is.

Throughput: decoding batch N+1 overlaps writing batch N (one writer thread, so writes
stay in order); at most two batches are in memory.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata

from tasks.core import config, dlq, kafka
from tasks.core.metrics import (
    CONSUMER_LAG,
    DRAIN_BATCH_SECONDS,
    DRAIN_DUPLICATES,
    DRAIN_LAST_SUCCESS,
    DRAIN_OFFSET_GAPS,
    DRAIN_REJECTS,
    DRAIN_ROWS,
    FRESHNESS,
)
from tasks.drain.contract import Batch, Fenced, Key, Rejected, Sink, Written, crash_point

log = logging.getLogger(__name__)
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


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
    gaps: dict[Key, int] = field(default_factory=dict)  # records skipped (allowed by operator)
    partitions: dict[str, list[int]] = field(default_factory=dict)  # topic -> assigned
    first_write_s: float | None = None  # from start to the first stored batch
    longest_wait_s: float = 0.0  # longest stretch without a stored batch while records waited
    seconds: float = 0.0
    stopped: str = ""

    def lag_by_topic(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (topic, _), n in self.lag.items():
            out[topic] += n
        return dict(out)


HANDOVER_CHECK_S = 1.0  # how often a following run looks for a newer one
# Python's cyclic garbage collector while a drain runs: a batch is tens of thousands of
# records, lines and tuples, freed by reference counting, and the default thresholds
# (700, 10, 10) start a collection every 700 of them, each also walking whatever the
# process holds (a flow run: all of Prefect). Measured on 500,000 trades, four runs
# without and five with: 14-19 against 18-21 us of Python CPU a trade. Restored when the
# drain ends.
GC_THRESHOLD = (50_000, 50, 1000)


class OffsetOutOfLog(Exception):
    """A stored offset that does not fit the partition's log, or offsets of another log."""


def parse_partitions(spec: str | list[int] | None) -> set[int] | None:
    """``None``/``""``: every partition; else a set from ``[0, 1]`` or ``"0-2,5"``."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, list):
        parts = {int(p) for p in spec}
    else:
        parts = set()
        for item in str(spec).split(","):
            m = _RANGE.fullmatch(item.strip())
            if m is None:
                raise ValueError(f"partitions: expected e.g. '0-2,5', got {spec!r}")
            parts.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    if not parts or min(parts) < 0:
        raise ValueError(f"partitions: expected non-negative partition numbers, got {spec!r}")
    return parts


class _Run:
    """State of one drain over its assigned partitions."""

    def __init__(
        self, sink: Sink, name: str, topics: list[str], settings, dlq_source: str, batch_size: int
    ):
        self.sink, self.name, self.topics, self.dlq_source = sink, name, topics, dlq_source
        # group_id only names the committed offsets (lag display, seeding); the consumer
        # never joins the group. One poll may fill a whole batch.
        # No auto_offset_reset: an offset that leaves the log mid-run (retention deleting
        # records not yet drained) raises instead of jumping silently to the log start.
        self.consumer = kafka.consumer(
            name, settings, max_poll_records=batch_size, auto_offset_reset="none"
        )
        self.allow_gaps = False
        self.settings = settings
        self.result = DrainResult(name, sink.name)
        self.expected: dict[Key, int | None] = {}  # what the sink holds before our next batch
        self.ends: dict[TopicPartition, int] = {}
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        self.resync = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"drain-{sink.name}")
        self._inflight: tuple[Future, Batch, dict[Key, tuple[int | None, int]]] | None = None
        self._producer: Any = None
        self._started = self._last_write = time.monotonic()

    # -- assignment -------------------------------------------------------------------
    def assign(self, partitions: set[int] | None, allow_gaps: bool, reset_log: bool) -> None:
        """Take the partitions, check each topic's log identity, start at stored offsets."""
        c = self.consumer
        self.allow_gaps = allow_gaps
        tps = []
        for topic in self.topics:
            known = c.partitions_for_topic(topic)
            if not known:
                raise ValueError(f"topic {topic!r} does not exist")
            chosen = sorted(known if partitions is None else known & partitions)
            self.result.partitions[topic] = chosen
            tps += [TopicPartition(topic, p) for p in chosen]
        if not tps:
            wanted = sorted(partitions or ())
            raise ValueError(f"none of partitions {wanted} exist in {self.topics}")
        for topic in self.topics:
            self._claim_log(topic, reset_log)
        c.assign(tps)
        self._position(tps, allow_gaps)

    def _claim_log(self, topic: str, reset: bool) -> None:
        cluster = self.consumer._client.cluster  # kafka-python keeps both ids from Metadata
        log_id = f"{cluster.cluster_id}/{cluster.topic_id(topic)}"
        before = self.sink.claim_log(self.name, topic, log_id, reset=reset)
        if before is not None and before != log_id and not reset:
            raise OffsetOutOfLog(
                f"{self.name}: stored offsets of {topic!r} belong to log {before} but the broker"
                f" serves log {log_id}: the topic was recreated or this is another cluster."
                " Their offsets mean nothing here; run once with reset_log=True to start this"
                " topic over from its log start (README: Operating Tapeline)"
            )

    def _position(self, tps: list[TopicPartition], allow_gaps: bool) -> None:
        """Seek to the sink's offsets (or the committed, or the log start), checking each
        against the log: outside it is an error, or an allowed and counted gap."""
        c = self.consumer
        stored = self.sink.stored_offsets(self.name, self.topics)
        starts, self.ends = c.beginning_offsets(tps), c.end_offsets(tps)
        inflight = self._inflight[2] if self._inflight is not None else {}
        for tp in tps:
            key = (tp.topic, tp.partition)
            if key in inflight:  # a write still in flight lands first; go on after it
                stored[key] = inflight[key][1]
            self.expected[key] = stored.get(key)
            start, end = starts[tp], self.ends[tp]
            at = stored.get(key)
            if at is None:
                committed = c.committed(tp)
                at = committed if committed is not None and start <= committed <= end else start
            elif not start <= at <= end:
                where = f"{tp.topic}[{tp.partition}]: stored offset {at}, log {start}..{end}"
                if at > end or not allow_gaps:
                    raise OffsetOutOfLog(
                        f"{self.name}: {where}: "
                        + (
                            "beyond the log end (topic recreated, truncated or another cluster)"
                            if at > end
                            else f"{start - at} records were deleted before they were drained;"
                            " rerun with allow_gaps=True to skip them (counted)"
                        )
                    )
                self._skip(tp, at, start, where)
                at = start
            c.seek(tp, at)

    def _skip(self, tp: TopicPartition, at: int, start: int, where: str) -> None:
        key = (tp.topic, tp.partition)
        self.result.gaps[key] = self.result.gaps.get(key, 0) + start - at
        log.error("%s: %s: skipping %d deleted records", self.name, where, start - at)

    def _out_of_range(self, positions: dict[TopicPartition, int]) -> None:
        """Kafka deleted records this run had not read yet: fail, or skip them counted."""
        if not positions:
            raise OffsetOutOfLog(f"{self.name}: a position fell out of a partition's log")
        starts = self.consumer.beginning_offsets(list(positions))
        for tp, at in positions.items():
            where = f"{tp.topic}[{tp.partition}]: position {at}, log starts at {starts[tp]}"
            if not self.allow_gaps or at > starts[tp]:
                raise OffsetOutOfLog(
                    f"{self.name}: {where}: records were deleted while this run read them;"
                    " rerun with allow_gaps=True to skip them (counted)"
                )
            self._skip(tp, at, starts[tp], where)
            self.consumer.seek(tp, starts[tp])

    # -- writes -----------------------------------------------------------------------
    def submit(self, batch: Batch, offsets: dict[Key, tuple[int | None, int]]) -> None:
        def work() -> tuple[Written, float]:
            t0 = time.perf_counter()
            written = self.sink.write(self.name, batch, offsets)
            return written, time.perf_counter() - t0

        self._inflight = (self._writer.submit(work), batch, offsets)

    def _finish_write(self) -> None:
        """Wait for the in-flight write and account for it (no Kafka calls but the DLQ)."""
        while self._inflight is not None:
            future, batch, offsets = self._inflight
            self._inflight = None
            try:
                written, seconds = future.result()
            except Fenced as e:
                log.warning("%s: %s; re-reading stored offsets", self.name, e)
                self.result.fenced += 1
                self.resync = True
                return
            except Rejected as e:  # dead-letter what the store refused, write the rest
                for ack in [self.reject(r.topic, r.partition, r, why) for r, why in e.records]:
                    ack.get(timeout=30)
                batch.drop([r for r, _ in e.records])
                self.submit(batch, offsets)
                continue
            crash_point("after_db_commit")
            now = time.monotonic()
            res = self.result
            if res.first_write_s is None:
                res.first_write_s = now - self._started
            res.longest_wait_s = max(res.longest_wait_s, now - self._last_write)
            self._last_write = now
            res.written.add(written)
            self.result.batch_seconds.append(seconds)
            for (t, p), (_, nxt) in offsets.items():
                self._to_commit[TopicPartition(t, p)] = OffsetAndMetadata(nxt, "", -1)

    def settle(self) -> None:
        """Finish the in-flight write, then show its offsets in Kafka (lag display)."""
        self._finish_write()
        commit = dict(self._to_commit)
        self._to_commit.clear()
        if not commit:
            return
        try:
            self.consumer.commit(commit)
        except KafkaError as e:  # the sink's offsets rule; this is the lag display only
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
            try:
                got = self.consumer.poll(
                    timeout_ms=poll_ms if n == 0 else 0, max_records=limit - n
                )
            except OffsetOutOfRangeError as e:
                self._out_of_range(e.args[0] if e.args and isinstance(e.args[0], dict) else {})
                continue
            if not got:
                break
            for tp, recs in got.items():
                out.setdefault(tp, []).extend(recs)
                n += len(recs)
        return out

    def caught_up(self) -> bool:
        """Every partition read up to the log end seen when the run started."""
        c = self.consumer
        return all(c.position(tp) >= end for tp, end in self.ends.items())

    def lag(self) -> dict[Key, int]:
        c = self.consumer
        tps = list(self.ends)
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

    def idle(self) -> None:
        """Nothing to read and nothing in flight: the wait for a stored batch starts over
        (``longest_wait_s`` counts only time in which records waited)."""
        if self._inflight is None:
            self._last_write = time.monotonic()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._producer is not None:
            self._producer.close(timeout=10)
        self.consumer.close(autocommit=False)
        self.sink.close()


def drain(
    sink: Sink,
    consumer: str,
    topics: list[str],
    *,
    dlq_source: str,
    settings: config.Settings | None = None,
    partitions: str | list[int] | None = None,
    allow_gaps: bool = False,
    reset_log: bool = False,
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 20_000,
    poll_ms: int = 1_000,
    follow: bool = False,
) -> DrainResult:
    """Drain ``topics`` (``partitions`` of them: all by default) into ``sink`` until caught
    up or a budget is spent. ``allow_gaps``: skip, and count, records deleted from the
    log before they were drained, instead of failing; ``reset_log``: accept a recreated
    topic (or another cluster), forgetting the offsets stored for the old one;
    ``follow``: keep reading after catching up, until the time budget ends or a newer
    following run of ``consumer`` takes over (module docstring)."""
    settings = settings or config.load()
    t0 = time.monotonic()
    run = _Run(sink, consumer, topics, settings, dlq_source, batch_size)
    res = run.result
    collect = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        run.assign(parse_partitions(partitions), allow_gaps, reset_log)
        handover = _Handover(sink, consumer) if follow else None
        while True:
            if time.monotonic() - t0 >= max_seconds:
                res.stopped = "time budget"
                break
            if handover is not None and handover.superseded():
                res.stopped = "handed over"
                break
            read = sum(res.records.values())
            if max_records is not None and read >= max_records:
                res.stopped = "record budget"
                break
            if not follow and run.caught_up():  # all read: stop, no poll waiting for more
                run.settle()
                if not run.resync:
                    res.stopped = "caught up"
                    break
            if run.resync:  # a write was fenced: go on from the offsets the sink holds
                run.resync = False
                run._position(list(run.ends), allow_gaps)
                continue
            limit = batch_size if max_records is None else min(batch_size, max_records - read)
            polled = run.poll(limit, poll_ms)
            if not polled:
                run.settle()
                run.idle()
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
                run._position(list(run.ends), allow_gaps)
                continue
            for key, (_, nxt) in offsets.items():
                run.expected[key] = nxt
            run.submit(batch, offsets)
        run.settle()
        res.lag = run.lag()
    finally:
        gc.set_threshold(*collect)
        res.seconds = time.monotonic() - t0
        run.close()
    return res


class _Handover:
    """A following run's generation, and whether a newer run has taken over since."""

    def __init__(self, sink: Sink, consumer: str):
        self.sink, self.consumer = sink, consumer
        self.mine = sink.take_over(consumer)
        self._checked = time.monotonic()
        log.info("%s: following as generation %d", consumer, self.mine)

    def superseded(self) -> bool:
        if time.monotonic() - self._checked < HANDOVER_CHECK_S:
            return False
        self._checked = time.monotonic()
        try:
            newest = self.sink.generation(self.consumer)
        except Exception as e:  # the store is away: the writes say so; ask again later
            log.warning("%s: could not read the newest generation: %s", self.consumer, e)
            return False
        if newest > self.mine:
            log.info("%s: generation %d took over from %d", self.consumer, newest, self.mine)
            return True
        return False


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
    for (topic, _), n in result.gaps.items():
        DRAIN_OFFSET_GAPS.labels(sink=sink, topic=topic).inc(n)
    for (topic, partition), n in result.lag.items():
        CONSUMER_LAG.labels(group=result.consumer, topic=topic, partition=str(partition)).set(n)
    now_us = time.time_ns() // 1000
    for (venue, symbol), newest in result.written.newest_us.items():
        FRESHNESS.labels(venue=venue, symbol=symbol).set((now_us - newest) / 1e6)
    DRAIN_LAST_SUCCESS.labels(flow=flow_name).set(time.time())
