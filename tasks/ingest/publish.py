"""Publishing normalised events to Kafka, with the delivery guarantee written down.

Guarantee (what ``Publisher`` keeps, with the producer settings of ``tasks.core.kafka``):

- Each event is one message keyed by its canonical symbol, so one symbol's events share a
  partition; the producer is idempotent with ``acks=all``, so its own retries neither
  reorder nor duplicate them.
- An event counts as published only in the broker's acknowledgement callback
  (``kafka_publish_success_total``, and the event-to-ack histogram), never when ``send``
  returns.
- At most ``max_in_flight`` messages are sent and not yet resolved. When Kafka is slow or
  down, ``publish`` blocks the caller (the shard's socket reader) until acks free room:
  backpressure, not memory growth. The producer retries by itself for
  ``delivery_timeout_ms`` (120 s), so an outage shorter than that costs only waiting.
- A message that still fails is counted (``kafka_publish_failure_total``) and never
  silently lost: a failed *trade* is handed back to its shard (``Lane.take_failed``,
  ``tasks.ingest.live.resend_failed``), which rewinds its gap tracker so the trade and
  everything after it is fetched again from the venue's REST history and re-published in
  id order, or, for a venue without one, publishes the trade itself again; a failed *DLQ
  record* is sent again (order does not matter there). A failed *quote* is counted and dropped: a
  quote is a snapshot superseded by the next one, and no venue serves quote history.
- A failure that is not retriable (authorization, an oversized record, a corrupt
  batch) puts kafka-python's idempotent producer in a fatal state in which every later
  send fails; ``Publisher.fatal`` then holds the error and the ingestion stops with it
  (retrying cannot help: it needs an operator). Nothing acknowledged is lost, and the
  next run resumes from what Kafka holds.
- Only while the run's lease holds (``tasks.ingest.lease``): with ``valid_until`` set,
  every send first checks the lease clock, and from ``valid_until`` on (or once
  ``fence`` was called) a lane refuses to send (``Fenced``); ``abort`` then drops what
  the producer holds unsent. Records already handed to the producer's network thread
  before the fence may still land (a frozen process that wakes up sends them before
  ``abort`` runs): duplicates at worst, which the drains' natural keys absorb.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

from kafka import KafkaProducer

from tasks.core import codec, dlq
from tasks.core.events import BookUpdate, Quote, Trade
from tasks.core.metrics import EVENT_TO_ACK, KAFKA_PUBLISH_FAILURE, KAFKA_PUBLISH_SUCCESS
from tasks.core.topics import BOOKS, DLQ, QUOTES, TRADES
from tasks.ingest.lease import clock
from tasks.ingest.resume import partition_of

log = logging.getLogger(__name__)
# Producer settings on top of tasks.core.kafka's, whose linger of 5 ms suits ingestion
# too: kafka-python spends most of its CPU per request, not per record, so at venue rates
# (a few thousand a second) batching decides the cost. Measured on 2 cores at 2,000
# msg/s against linger 1 ms: ingestion CPU 270-300 against 410 us a message, broker 32-40
# against 65, p50/p99 event-to-ack 6.5-7/14-15 against 4.5/13-14 ms; at 4,000 msg/s 150
# against 170-180 us. 10 ms saved no more CPU and doubled p99. Reconnect backoff capped
# at 1 s (kafka-python's grows to 30 s), so a backlog starts draining within a second of
# the broker coming back.
PRODUCER_TUNING: dict[str, Any] = {"reconnect_backoff_max_ms": 1000}


@dataclass(frozen=True)
class Topics:
    """Where each event type goes; tests and demos point these at their own topics."""

    trades: str = TRADES
    quotes: str = QUOTES
    books: str = BOOKS


class Closed(Exception):
    """``publish`` was waiting for room when the publisher was closed."""


class Fenced(Closed):
    """The run's lease is lost or expiring: this run must not send anything more."""


class ProducerDied(RuntimeError):
    """The producer's network thread is gone: this process can publish nothing more."""


class LatencyWindow:
    """The last ``size`` event-to-ack latencies (microseconds) for exact percentiles in
    the progress line and the benchmark; one array store per ack."""

    def __init__(self, size: int = 65536):
        self._values = array("q", bytes(8 * size))
        self._size = size
        self._n = 0

    def add(self, micros: int) -> None:
        self._values[self._n % self._size] = micros
        self._n += 1

    def percentiles(self, *qs: float) -> list[float] | None:
        """Milliseconds at each quantile in ``qs`` (0..1), or None before the first ack."""
        n = min(self._n, self._size)
        if not n:
            return None
        values = sorted(self._values[:n])
        return [values[min(n - 1, int(q * n))] / 1000 for q in qs]

    def reset(self) -> None:
        self._n = 0


class Publisher:
    """One shared producer for all shards of a venue; each shard publishes via a ``Lane``.

    The in-flight bound ``max_in_flight`` is split evenly over ``lanes``: each lane counts
    its own sends (reader thread) and resolutions (network thread), one writer each, so
    the bound costs no lock on the hot path.
    """

    def __init__(
        self,
        producer: KafkaProducer,
        venue: str,
        topics: Topics | None = None,
        max_in_flight: int = 10_000,
        lanes: int = 1,
    ):
        if max_in_flight < lanes or lanes < 1:
            raise ValueError(f"max_in_flight ({max_in_flight}) must be >= lanes ({lanes}) >= 1")
        self.producer = producer
        self.venue = venue
        self.topics = topics or Topics()
        self.max_in_flight = max_in_flight
        self.lane_cap = max_in_flight // lanes
        self.latency = LatencyWindow()
        self.lanes: list[Lane] = []
        self.closed = False
        self.fatal: BaseException | None = None
        # Lease clock (tasks.ingest.lease.clock) until which sending is allowed; None: no
        # lease (backfills, benchmarks). ``fenced``: why sending stopped for good.
        self.valid_until: float | None = None
        self.fenced: str | None = None
        self.aborted = False  # what was unresolved was dropped on purpose (fence, close)
        self._partitions: dict[str, int] = {}

    def lane(self, shard: str) -> Lane:
        lane = Lane(self, shard)
        self.lanes.append(lane)
        return lane

    def partition(self, topic: str, symbol: str) -> int:
        """The partition kafka-python's default partitioner picks for key ``symbol``
        (murmur2 of the key), computed once per symbol instead of on every send."""
        n = self._partitions.get(topic)
        if n is None:
            n = self._partitions[topic] = len(self.producer.partitions_for(topic))
        return partition_of(symbol, n)

    @property
    def in_flight(self) -> int:
        return sum(lane.in_flight for lane in self.lanes)

    @property
    def peak_in_flight(self) -> int:
        """An upper bound of the most messages unresolved at once (sum of lane peaks)."""
        return sum(lane.peak for lane in self.lanes)

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued and wait until each message is acked or has failed."""
        self.producer.flush(timeout=timeout)

    def check_sender(self) -> bool:
        """False (and ``fatal`` set) once kafka-python's network thread has died: nothing
        would be acknowledged again, and readers would wait for room for good (seen after
        the worker that started the run was killed: the run lived on, silent)."""
        sender = getattr(self.producer, "_sender", None)
        if self.fatal is None and not self.closed and sender is not None and not sender.is_alive():
            self.fatal = ProducerDied("the Kafka producer's network thread died")
            self.stop_waiting()
        return self.fatal is None or not isinstance(self.fatal, ProducerDied)

    def stop_waiting(self) -> None:
        """Make readers blocked on a full lane raise ``Closed``."""
        self.closed = True
        for lane in self.lanes:
            lane.room.set()

    def extend(self, valid_until: float) -> None:
        """The lease was renewed: sending is allowed until ``valid_until`` (unless fenced)."""
        if self.fenced is None:
            self.valid_until = valid_until

    def fence_reason(self) -> str | None:
        """Why this publisher may no longer send (None: it may)."""
        if self.fenced is None and self.valid_until is not None and clock() >= self.valid_until:
            self.fence("fenced: the lease was not renewed in time")
        return self.fenced

    def fence(self, reason: str) -> str:
        """Refuse every later send, for good, and wake blocked senders; returns the reason
        in force (the first one given)."""
        if self.fenced is None:
            self.fenced = reason
        self.stop_waiting()
        return self.fenced

    def abort(self, wait_s: float = 5.0) -> None:
        """Drop what the producer has not had acknowledged yet: those records fail now
        instead of reaching Kafka later (after fencing, or when a flush timed out)."""
        self.aborted = True
        sender = getattr(self.producer, "_sender", None)  # kafka-python's I/O thread
        if sender is None:
            return
        sender.force_close()  # fails incomplete batches, closes its connections
        sender.join(wait_s)

    def close(self, timeout: float = 30.0) -> int:
        """Wake blocked publishers, flush for up to ``timeout`` (not when fenced) and close
        the producer; returns how many messages were still unresolved (0 after a clean
        flush). What is left unresolved is dropped."""
        self.stop_waiting()
        if self.fenced is None:
            try:
                self.producer.flush(timeout=timeout)
            except Exception as e:  # KafkaTimeoutError: report what is left, then close
                log.warning("%s: flush did not finish in %.0f s: %s", self.venue, timeout, e)
        left = self.in_flight
        if left or self.fenced is not None:
            self.abort()
        try:
            self.producer.close(timeout=0 if left or self.fenced else 5)
        except Exception as e:  # closing after an abort: nothing is left to lose
            log.warning("%s: producer close: %s", self.venue, e)
        return left


class Lane:
    """One shard's way into the shared publisher: its bound, metrics, counts, failures.

    ``publish`` and ``dead_letter`` run in the shard's reader thread (the only writer of
    ``out``, every message sent, and ``sent``, the events among them); the resolution
    handlers run in the producer's network thread (the only writer of ``resolved``,
    ``acked``, ``failed``).
    """

    def __init__(self, publisher: Publisher, shard: str):
        self.publisher = publisher
        self.shard = shard
        self.cap = publisher.lane_cap
        self.room = threading.Event()
        venue = publisher.venue
        self._send = publisher.producer.send
        self._latency = publisher.latency
        topics = publisher.topics
        self._topics = {Trade: topics.trades, Quote: topics.quotes, BookUpdate: topics.books}
        self._routes: dict[type, dict[str, tuple[str, bytes, int]]] = {t: {} for t in self._topics}
        self._ok = KAFKA_PUBLISH_SUCCESS.labels(venue=venue, shard=shard)
        self._fail = KAFKA_PUBLISH_FAILURE.labels(venue=venue, shard=shard)
        self._hist = {
            Trade: EVENT_TO_ACK.labels(venue=venue, channel="trades"),
            Quote: EVENT_TO_ACK.labels(venue=venue, channel="quotes"),
            BookUpdate: EVENT_TO_ACK.labels(venue=venue, channel="books"),
        }
        self.out = 0
        self.sent = 0
        self.resolved = 0
        self.acked = 0
        self.failed = 0
        self.peak = 0
        self.dead_letters = 0
        self._waiting = False
        self._failed_trades: deque[Trade] = deque()
        # symbols whose book event failed: their next book event must be a snapshot
        self.failed_books: deque[str] = deque()
        self._failed_dlq: deque[tuple[str, str, bytes | str, dict]] = deque()

    @property
    def in_flight(self) -> int:
        return self.out - self.resolved

    def _reserve(self) -> None:
        """Return once this lane has room for one more message (backpressure) and the
        lease still allows sending (else ``Fenced``, for good)."""
        n = self.out - self.resolved
        if n >= self.cap:
            self._waiting = True
            try:
                while self.out - self.resolved >= self.cap:
                    if self.publisher.closed or not self.publisher.check_sender():
                        raise Closed("publisher closed while waiting for Kafka")
                    self.room.wait(0.05)
                    self.room.clear()
            finally:
                self._waiting = False
            n = self.out - self.resolved
        if n >= self.peak:
            self.peak = n + 1
        p = self.publisher
        until = p.valid_until
        if p.fenced is not None or (until is not None and clock() >= until):
            raise Fenced(p.fence("fenced: the lease was not renewed in time"))

    def _free(self) -> None:
        self.resolved += 1
        if self._waiting:
            self.room.set()

    def publish(self, event: Trade | Quote | BookUpdate, live: bool = True) -> None:
        """Send one event; blocks while this lane's share of ``max_in_flight`` is
        unresolved. ``live=False`` (repaired history) keeps old event times out of the
        latency metric."""
        self._reserve()
        kind = type(event)
        route = self._routes[kind].get(event.symbol)
        if route is None:
            route = self._route(kind, event.symbol)
        topic, key, partition = route
        future = self._send(topic, key=key, value=codec.encode(event), partition=partition)
        self.out += 1
        self.sent += 1
        # One handler for both outcomes, registered without add_both's two partials
        # (half the reader's cost of it: ~2 us a message on this project's machine).
        resolved = partial(self._resolved, event, live)
        future.add_callback(resolved)
        future.add_errback(resolved)

    def _route(self, kind: type, symbol: str) -> tuple[str, bytes, int]:
        topic = self._topics[kind]
        route = (topic, symbol.encode(), self.publisher.partition(topic, symbol))
        self._routes[kind][symbol] = route
        return route

    def _failure(self, error: BaseException) -> None:
        self.failed += 1
        self._fail.inc()
        p = self.publisher
        if not getattr(error, "retriable", False) and p.fatal is None and not p.aborted:
            p.fatal = error  # (records dropped by ``abort`` are not the producer's fault)

    def _resolved(self, event: Trade | Quote | BookUpdate, live: bool, result: Any) -> None:
        self._free()
        if isinstance(result, BaseException):
            self._failure(result)
            if type(event) is Trade:
                self._failed_trades.append(event)
            elif type(event) is BookUpdate:
                self.failed_books.append(event.symbol)
            if (self.failed == 1 or self.failed % 1000 == 0) and not self.publisher.aborted:
                log.error(
                    "%s shard %s: delivery failed (%d so far): %s",
                    self.publisher.venue, self.shard, self.failed, result,
                )  # fmt: skip
            return
        self.acked += 1
        self._ok.inc()
        if live:
            micros = time.time_ns() // 1000 - event.event_us
            self._latency.add(micros)
            self._hist[type(event)].observe(micros / 1e6)

    def dead_letter(self, source: str, reason: str, raw: bytes | str, **context: Any) -> None:
        """Send a rejected frame to the DLQ (``tasks.core.dlq.send``) under the same bound."""
        self._reserve()
        future = dlq.send(self.publisher.producer, source, reason, raw, **context)
        self.out += 1
        self.dead_letters += 1
        future.add_both(self._dlq_resolved, (source, reason, raw, context))

    def _dlq_resolved(self, record: tuple[str, str, bytes | str, dict], result: Any) -> None:
        self._free()
        if isinstance(result, BaseException):
            self._failure(result)
            self._failed_dlq.append(record)
            log.error("%s shard %s: DLQ record not delivered, will resend: %s",
                      self.publisher.venue, self.shard, result)  # fmt: skip

    @property
    def has_failures(self) -> bool:
        return bool(self._failed_trades or self._failed_dlq)

    def hand_back(self, trades: list[Trade]) -> None:
        """Failed trades taken but not sent again: first in line for the next round."""
        self._failed_trades.extendleft(reversed(trades))

    def take_failed(self) -> list[Trade]:
        """Resend failed DLQ records, and return the failed trades (once) for rewinding."""
        while self._failed_dlq:
            record = self._failed_dlq.popleft()
            source, reason, raw, context = record
            self._reserve()
            # straight to the producer: the DLQ metric counted this record already
            value = dlq.record(source, reason, raw, **context)
            future = self._send(DLQ, key=source.encode(), value=value)
            self.out += 1
            future.add_both(self._dlq_resolved, record)
        trades = []
        while self._failed_trades:
            trades.append(self._failed_trades.popleft())
        return trades
