"""Publishing normalised events to Kafka, with the delivery guarantee written down.

Guarantee (what ``Publisher`` keeps, with the producer settings of ``tasks.kafka``):

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
  silently lost: a failed *trade* is handed back to its shard (``Lane.take_failed``),
  which rewinds its gap tracker so the trade and everything after it is fetched again
  from the venue's REST history and re-published in id order; a failed *DLQ record* is
  sent again (order does not matter there). A failed *quote* is counted and dropped: a
  quote is a snapshot superseded by the next one, and no venue serves quote history.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer

from tasks import codec, dlq
from tasks.events import Quote, Trade
from tasks.metrics import EVENT_TO_ACK, KAFKA_PUBLISH_FAILURE, KAFKA_PUBLISH_SUCCESS
from tasks.topics import DLQ, QUOTES, TRADES

log = logging.getLogger(__name__)
# Producer settings on top of tasks.kafka's: linger 5 ms batches ~10 messages per
# partition request at 2,000 msg/s (more linger only adds latency); a reconnect backoff
# capped at 1 s (kafka-python's default grows to 30 s) so the backlog starts draining
# within a second of the broker coming back rather than up to half a minute later.
PRODUCER_TUNING: dict[str, Any] = {
    "linger_ms": 5,
    "batch_size": 256 * 1024,
    "reconnect_backoff_max_ms": 1000,
}


@dataclass(frozen=True)
class Topics:
    """Where each event type goes; tests and demos point these at their own topics."""

    trades: str = TRADES
    quotes: str = QUOTES


class Closed(Exception):
    """``publish`` was waiting for room when the publisher was closed."""


class InflightLimit:
    """A counting bound on unresolved messages; ``acquire`` blocks at the bound."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.limit = limit
        self.count = 0
        self.peak = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False

    def acquire(self) -> None:
        with self._cond:
            while self.count >= self.limit:
                if self._closed:
                    raise Closed("publisher closed while waiting for Kafka")
                self._cond.wait(0.5)
            self.count += 1
            if self.count > self.peak:
                self.peak = self.count

    def release(self) -> None:
        with self._cond:
            self.count -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


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
    """One shared producer for all shards of a venue; each shard publishes via a ``Lane``."""

    def __init__(
        self,
        producer: KafkaProducer,
        venue: str,
        topics: Topics | None = None,
        max_in_flight: int = 10_000,
    ):
        self.producer = producer
        self.venue = venue
        self.topics = topics or Topics()
        self.limit = InflightLimit(max_in_flight)
        self.latency = LatencyWindow()
        self.lanes: list[Lane] = []

    def lane(self, shard: str) -> Lane:
        lane = Lane(self, shard)
        self.lanes.append(lane)
        return lane

    @property
    def in_flight(self) -> int:
        return self.limit.count

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued and wait until each message is acked or has failed."""
        self.producer.flush(timeout=timeout)

    def close(self, timeout: float = 30.0) -> int:
        """Wake blocked publishers, flush for up to ``timeout`` and close the producer;
        returns how many messages were still unresolved (0 after a clean flush)."""
        self.limit.close()
        try:
            self.producer.flush(timeout=timeout)
        except Exception as e:  # KafkaTimeoutError: report what is left, then close anyway
            log.warning("%s: flush did not finish in %.0f s: %s", self.venue, timeout, e)
        left = self.limit.count
        self.producer.close(timeout=0 if left else 5)
        return left


class Lane:
    """One shard's way into the shared publisher: its metrics, counts and failures.

    ``publish`` and ``dead_letter`` run in the shard's reader thread; the ack handler runs
    in the producer's network thread, the only writer of ``acked``/``failed``.
    """

    def __init__(self, publisher: Publisher, shard: str):
        self.publisher = publisher
        self.shard = shard
        venue = publisher.venue
        self._send = publisher.producer.send
        self._limit = publisher.limit
        self._latency = publisher.latency
        self._topics = {Trade: publisher.topics.trades, Quote: publisher.topics.quotes}
        self._ok = KAFKA_PUBLISH_SUCCESS.labels(venue=venue, shard=shard)
        self._fail = KAFKA_PUBLISH_FAILURE.labels(venue=venue, shard=shard)
        self._hist = {
            Trade: EVENT_TO_ACK.labels(venue=venue, channel="trades"),
            Quote: EVENT_TO_ACK.labels(venue=venue, channel="quotes"),
        }
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.dead_letters = 0
        self._failed_trades: deque[Trade] = deque()
        self._failed_dlq: deque[tuple[str, str, bytes | str, dict]] = deque()

    def publish(self, event: Trade | Quote, live: bool = True) -> None:
        """Send one event; blocks while ``max_in_flight`` messages are unresolved.
        ``live=False`` (repaired history) keeps old event times out of the latency metric."""
        self._limit.acquire()
        kind = type(event)
        try:
            future = self._send(
                self._topics[kind], key=event.symbol.encode(), value=codec.encode(event)
            )
        except BaseException:
            self._limit.release()
            raise
        self.sent += 1
        future.add_both(self._resolved, event, live)

    def _resolved(self, event: Trade | Quote, live: bool, result: Any) -> None:
        self._limit.release()
        if isinstance(result, BaseException):
            self.failed += 1
            self._fail.inc()
            if type(event) is Trade:
                self._failed_trades.append(event)
            if self.failed == 1 or self.failed % 1000 == 0:
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
        """Send a rejected frame to the DLQ (``tasks.dlq.send``) under the same bound."""
        self._limit.acquire()
        try:
            future = dlq.send(self.publisher.producer, source, reason, raw, **context)
        except BaseException:
            self._limit.release()
            raise
        self.dead_letters += 1
        future.add_both(self._dlq_resolved, (source, reason, raw, context))

    def _dlq_resolved(self, record: tuple[str, str, bytes | str, dict], result: Any) -> None:
        self._limit.release()
        if isinstance(result, BaseException):
            self.failed += 1
            self._fail.inc()
            self._failed_dlq.append(record)
            log.error("%s shard %s: DLQ record not delivered, will resend: %s",
                      self.publisher.venue, self.shard, result)  # fmt: skip

    @property
    def has_failures(self) -> bool:
        return bool(self._failed_trades or self._failed_dlq)

    def take_failed(self) -> list[Trade]:
        """Resend failed DLQ records, and return the failed trades (once) for rewinding."""
        while self._failed_dlq:
            record = self._failed_dlq.popleft()
            source, reason, raw, context = record
            self._limit.acquire()
            try:  # straight to the producer: the DLQ metric counted this record already
                value = dlq.record(source, reason, raw, **context)
                future = self._send(DLQ, key=source.encode(), value=value)
            except BaseException:
                self._limit.release()
                raise
            future.add_both(self._dlq_resolved, record)
        trades = []
        while self._failed_trades:
            trades.append(self._failed_trades.popleft())
        return trades
