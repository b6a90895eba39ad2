"""The ingestion machinery ``flows/ingest.py`` runs: venue frames in, Kafka messages out.

One ``ShardWorker`` per WebSocket shard, each in its own thread: its ``Connection`` reads
frames, the venue adapter parses them in that same thread, bad frames go to the DLQ,
trades of sequential-id venues pass through the shard's ``GapTracker``, holes in a venue's
per-connection message numbers are counted (``SequenceWatch``), order books (channel
'books') are verified and turned into book events by the shard's ``BookKeeper`` (which
asks the shard to fetch a REST snapshot or resubscribe when a book must be rebuilt), and
every event is published through the shard's ``Lane`` of the one shared ``Publisher``.
Nothing here imports Prefect; the flow decides which steps show up as Prefect tasks.
"""

from __future__ import annotations

import contextvars
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tasks import venues
from tasks.books.keeper import BookKeeper, keep_levels
from tasks.core import config
from tasks.core.codec import MAX_BOOK_DEPTH
from tasks.core.events import Trade
from tasks.core.kafka import producer
from tasks.core.metrics import (
    BOOK_AGE,
    BOOK_RESYNCS,
    BOOKS_OUT_OF_SYNC,
    INFLIGHT,
    MESSAGES_MISSED,
    VENDOR_FETCH_FAILURE,
    VENDOR_FETCH_SUCCESS,
    VENUE_LAG,
)
from tasks.ingest.gaps import GapTracker, SequenceWatch
from tasks.ingest.publish import PRODUCER_TUNING, Closed, Lane, Publisher, Topics
from tasks.venues.base import FeedError, Parsed, Venue, VenueConfig
from tasks.venues.connection import Connection, ConnectionPolicy
from tasks.venues.http import Http, RestError

log = logging.getLogger(__name__)
CHANNELS = ("trades", "quotes")


@dataclass(frozen=True)
class Plan:
    """What one ingestion run connects to: checked before anything is opened."""

    venue: str
    config: VenueConfig
    symbols: tuple[str, ...]
    channels: tuple[str, ...]
    shards: tuple[tuple[str, ...], ...]
    book_snapshot_s: float = 10.0  # event time between two book snapshots (channel 'books')

    def adapter(self) -> Venue:
        """A fresh adapter (each shard has its own: adapters keep a symbol map)."""
        return venues.venue(self.venue, self.config)

    @property
    def repairs_gaps(self) -> bool:
        return "trades" in self.channels and venues.spec(self.venue).sequential_ids


def plan(
    venue: str,
    symbols: list[str],
    channels: list[str] | None,
    shard_size: int | None = None,
    simulator_url: str | None = None,
    credential: str = "",
    book_depth: int = 10,
    book_snapshot_s: float = 10.0,
) -> Plan:
    """Validate the configuration; raises ValueError naming what is wrong. No channels:
    trades and quotes where the venue has them (Finnhub: trades only); 'books' is asked
    for by name. ``credential``: the venue's API token, where it needs one
    (``VenueSpec.credential``). ``book_depth``: levels a side of the published books."""
    if not 1 <= book_depth <= MAX_BOOK_DEPTH:
        raise ValueError(f"book_depth must be in [1, {MAX_BOOK_DEPTH}], got {book_depth}")
    if not 0.1 <= book_snapshot_s <= 3600:
        raise ValueError(f"book_snapshot_s must be in [0.1, 3600], got {book_snapshot_s}")
    cfg = replace(venues.venue_config(venue, simulator_url, credential), book_depth=book_depth)
    spec = venues.spec(venue)
    if spec.credential and not cfg.credential:
        raise ValueError(f"{venue} needs an API token ({spec.credential}); none was given")
    adapter = venues.venue(venue, cfg)
    if not channels:
        channels = [c for c in CHANNELS if c in adapter.channels]
    chans = tuple(dict.fromkeys(channels))
    unknown = [c for c in chans if c not in adapter.channels]
    if not chans or unknown:
        raise ValueError(f"channels must be among {adapter.channels}, got {list(channels)}")
    canonical = []
    for s in symbols:
        adapter.to_venue_symbol(s)  # raises ValueError for a malformed symbol
        canonical.append(s.upper())
    if not canonical:
        raise ValueError("no symbols to ingest")
    if "books" in chans and not spec.book_sync:
        raise ValueError(f"{venue} has no book procedure; channel 'books' is not available")
    shards = adapter.shards(canonical, list(chans), shard_size)  # type: ignore[attr-defined]
    return Plan(
        venue, cfg, tuple(dict.fromkeys(canonical)), chans, tuple(map(tuple, shards)),
        book_snapshot_s,
    )  # fmt: skip


class ShardWorker:
    """One WebSocket shard from frame to publish; runs in its own thread."""

    def __init__(
        self,
        plan: Plan,
        index: int,
        lane: Lane,
        run_id: str,
        policy: ConnectionPolicy,
        last_trades: dict[str, Trade],
    ):
        self.plan = plan
        self.index = index
        self.shard = str(index)
        self.lane = lane
        self.run_id = run_id
        self.symbols = list(plan.shards[index])
        self.adapter = plan.adapter()
        name = plan.config.name
        self.source = f"ingest.{name}"
        self.lag_us = 0
        self.bad_frames = 0
        self.venue_errors = 0
        self._ok = VENDOR_FETCH_SUCCESS.labels(venue=name, shard=self.shard)
        self._bad = VENDOR_FETCH_FAILURE.labels(venue=name, shard=self.shard)
        self._missed = MESSAGES_MISSED.labels(venue=name, shard=self.shard)
        self.sequence = SequenceWatch()
        self.tracker: GapTracker | None = None
        history = venues.gap_history(plan.venue, plan.config) if "trades" in plan.channels else None
        if history is not None:
            mine = [t for s, t in last_trades.items() if s in self.symbols]
            self.tracker = GapTracker(
                name,
                history,
                lane.publish,
                {t.symbol: t.trade_id for t in mine},
                {t.symbol: t.event_us for t in mine},
            )
        self.books: BookKeeper | None = None
        self.depth_rest: Any = None  # Binance: the REST client that serves book snapshots
        if "books" in plan.channels:
            protocol = venues.spec(plan.venue).book_sync
            subscribed = getattr(self.adapter, "book_depth", None)
            self.books = BookKeeper(
                name, protocol, self.symbols, plan.config.book_depth,
                keep=keep_levels(protocol, plan.config.book_depth, subscribed),
                snapshot_every_s=plan.book_snapshot_s, on_resync=self._resynced,
            )  # fmt: skip
            if protocol == "binance":
                # One quick try, no waiting for the venue's weight budget: the fetch runs in
                # the reader thread, and a failed one is asked again later (BookKeeper).
                http = Http(plan.config.rest_url, timeout_s=5.0, attempts=1, weight_slowdown=2.0)
                self.depth_rest = venues.spec(plan.venue).rest(plan.config, http)
        self.connection = Connection(
            self.adapter,
            self.symbols,
            list(plan.channels),
            self.on_frame,
            shard=self.shard,
            policy=policy,
            on_connect=self.on_connect,
        )

    def run(self) -> dict[str, Any]:
        """Stream until ``stop``; returns this shard's counts."""
        self.connection.run()
        return self.counts()

    def stop(self) -> None:
        self.connection.stop()

    def on_connect(self) -> None:
        self.sequence.reset()  # numbered per connection
        if self.books is not None:
            self.books.on_connect()
        if self.tracker is not None:
            try:
                self.tracker.after_connect(self.symbols)
            except Closed:  # fenced (or stopping): this shard reads no more
                self.connection.stop()
                raise

    def on_frame(self, raw: bytes, recv_us: int) -> None:
        lane = self.lane
        try:
            if lane.has_failures:
                self._recover()
            try:
                parsed = self.adapter.parse(raw, recv_us)
            except FeedError as e:
                self.bad_frames += 1
                self._bad.inc()
                self.sequence.reset()
                lane.dead_letter(
                    self.source, e.reason, raw,
                    venue=self.plan.config.name, shard=self.shard, run=self.run_id,
                    recv_us=recv_us,
                )  # fmt: skip
                return
            self._ok.inc()
            if parsed.sequence is not None and (missed := self.sequence.see(parsed.sequence)):
                self._missed.inc(missed)
                log.warning(
                    "%s shard %s: %d message(s) missing before number %d",
                    self.source, self.shard, missed, parsed.sequence,
                )  # fmt: skip
            if parsed.reply is not None:
                self.connection.send(parsed.reply)
            if self.books is not None:
                self._books(parsed, recv_us)
            if parsed.control is not None:
                self._control(parsed)
                return
            tracker = self.tracker
            for event in parsed.events:
                if type(event) is Trade:
                    self.lag_us = recv_us - event.event_us
                    if tracker is not None:
                        tracker.on_trade(event)
                        continue
                lane.publish(event)
        except Closed:  # fenced (or stopping): this shard reads no more; the flow ends the run
            self.connection.stop()
            raise

    def _resynced(self, reason: str, so_far: int) -> None:
        BOOK_RESYNCS.labels(venue=self.plan.config.name, reason=reason).inc()
        log.warning("%s shard %s: book resync (%s), %d so far",
                    self.source, self.shard, reason, so_far)  # fmt: skip

    def _books(self, parsed: Parsed, recv_us: int) -> None:
        """Book events through the keeper (every frame: Coinbase numbers them all), then
        what it asks for to rebuild a book: resubscriptions, REST snapshots (fetched
        here, in order with the stream, one try of at most 5 s each: the socket buffers
        meanwhile, and Binance's procedure allows the wait)."""
        books, lane = self.books, self.lane
        assert books is not None
        while lane.failed_books:
            books.failed(lane.failed_books.popleft())
        for update in books.on_frame(parsed.books, parsed.sequence, recv_us):
            lane.publish(update)
        if books.protocol == "binance":
            for symbol in books.due_fetches():
                try:
                    snapshot = self.depth_rest.depth(symbol, books.keep)
                except (RestError, FeedError) as e:
                    log.warning("%s shard %s: %s book snapshot: %s",
                                self.source, self.shard, symbol, e)  # fmt: skip
                    books.fetch_failed(symbol)
                    continue
                for update in books.on_rest_snapshot(snapshot, recv_us):
                    lane.publish(update)
        elif resubscribe := books.take_resubscribe():
            for frame in self.adapter.book_resync_frames(resubscribe):  # type: ignore[attr-defined]
                self.connection.send(frame)

    def _control(self, parsed: Parsed) -> None:
        if parsed.control == "server_shutdown":
            log.info(
                "%s shard %s: venue is shutting down (%s)", self.source, self.shard, parsed.detail
            )
            self.connection.request_reconnect("server_shutdown")
        elif parsed.control == "error":
            self.venue_errors += 1
            log.warning("%s shard %s: venue error: %s", self.source, self.shard, parsed.detail)

    def _recover(self) -> None:
        """Kafka refused some messages for good (see ``resend_failed``); after a fatal
        producer error there is nothing to do: the ingestion stops."""
        if self.lane.publisher.fatal is None:
            resend_failed(self.lane, self.tracker)

    def counts(self) -> dict[str, Any]:
        t = self.tracker
        lane, conn = self.lane, self.connection
        return {
            "shard": self.shard,
            "symbols": len(self.symbols),
            "frames": conn.frames,
            "bad_frames": self.bad_frames,
            "venue_errors": self.venue_errors,
            "sent": lane.sent,
            "acked": lane.acked,
            "failed": lane.failed,
            "dead_letters": lane.dead_letters,
            "connects": conn.connects,
            "reconnects": dict(conn.reconnects),
            "sequence_gaps": self.sequence.holes,
            "messages_missed": self.sequence.missed,
            "duplicates_dropped": t.duplicates if t else 0,
            "gaps_found": t.gaps_found if t else 0,
            "gaps_repaired": t.gaps_repaired if t else 0,
            "gaps_given_up": t.gaps_given_up if t else 0,
            "trades_repaired": t.trades_repaired if t else 0,
            "book_snapshots": self.books.snapshots if self.books else 0,
            "book_deltas": self.books.deltas if self.books else 0,
            "book_resyncs": dict(self.books.resyncs) if self.books else {},
        }


def resend_failed(lane: Lane, tracker: GapTracker | None) -> int:
    """Once every outcome is known, send the lane's failed DLQ records again and give its
    failed trades another go: a venue with gap repair rewinds its gap tracker to before
    the first one, so they and what followed are fetched and published again in id
    order; a venue without it (ids not sequential: none in the registry today) publishes
    the same trades again, in the order they failed, after trades that came later (the
    sinks key trades by id). Returns the trades handed back."""
    lane.publisher.flush()
    failed = lane.take_failed()
    if tracker is not None:
        if failed:
            tracker.rewind(failed)
    else:
        for i, trade in enumerate(failed):
            try:
                lane.publish(trade, live=False)
            except BaseException:  # fenced or stopping: what was not sent stays failed
                lane.hand_back(failed[i:])
                raise
    return len(failed)


ShardRunner = Callable[[ShardWorker], Any]
_aged: set[tuple[str, str]] = set()  # the (venue, symbol) book ages currently exported
_SUMMED = (
    "frames", "bad_frames", "venue_errors", "sent", "acked", "failed", "dead_letters",
    "connects", "duplicates_dropped", "gaps_found", "gaps_repaired", "gaps_given_up",
    "trades_repaired", "sequence_gaps", "messages_missed", "book_snapshots", "book_deltas",
)  # fmt: skip


def freeze_heap() -> None:
    """Take every object alive now out of the garbage collector's sight; for a process
    that is about to stream, once it is set up.

    A flow-run process holds 130,000+ objects before its first frame (Prefect, the run's
    state, the modules). A full collection walks all of them with every thread stopped:
    90 ms of CPU on this project's 2-core machine, one every 30 s or so at 2,000 msg/s,
    and each holds ~180 messages past the 50 ms p99 target. Frozen, a full collection
    walks only what streaming made (4 ms). Frozen objects are still freed when nothing
    refers to them; only a cycle among them would stay, so garbage is collected first."""
    gc.collect()
    gc.freeze()


class Ingestion:
    """Every shard of one venue over one shared producer."""

    def __init__(
        self,
        plan: Plan,
        settings: config.Settings,
        *,
        run_id: str,
        topics: Topics | None = None,
        max_in_flight: int = 10_000,
        policy: ConnectionPolicy | None = None,
        last_trades: dict[str, Trade] | None = None,
        shards: Sequence[int] | None = None,
    ):
        self.plan = plan
        self.run_id = run_id
        # ``shards``: the plan's shard indices this process runs (default: all of them);
        # a shard keeps its index as its name, so metrics and logs name it alike whichever
        # process runs it (``tasks.ingest.processes``).
        self.shard_ids = list(range(len(plan.shards)) if shards is None else shards)
        if not self.shard_ids or not set(self.shard_ids) <= set(range(len(plan.shards))):
            raise ValueError(f"shards {self.shard_ids} are not among the plan's {len(plan.shards)}")
        mine = {s for i in self.shard_ids for s in plan.shards[i]}
        self.symbols = [s for s in plan.symbols if s in mine]
        self.publisher = Publisher(
            producer(settings, **PRODUCER_TUNING),
            plan.config.name,
            topics,
            max_in_flight,
            lanes=len(self.shard_ids),
        )
        policy = policy or ConnectionPolicy()
        self.workers = [
            ShardWorker(plan, i, self.publisher.lane(str(i)), run_id, policy, last_trades or {})
            for i in self.shard_ids
        ]
        self.errors: list[tuple[int, BaseException]] = []
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()
        self._last_progress = (self._started, 0, 0)
        self._inflight = INFLIGHT.labels(venue=plan.config.name)
        self._lag = VENUE_LAG.labels(venue=plan.config.name)

    def start(self, run_shard: ShardRunner = ShardWorker.run) -> None:
        """One thread per shard, each running ``run_shard(worker)`` in a copy of the
        caller's context (so Prefect tasks called there belong to the flow run)."""
        for w in self.workers:
            ctx = contextvars.copy_context()
            t = threading.Thread(
                target=ctx.run,
                args=(self._guard, run_shard, w),
                name=f"{self.plan.config.name}-shard-{w.shard}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def _guard(self, run_shard: ShardRunner, worker: ShardWorker) -> None:
        try:
            run_shard(worker)
        except BaseException as e:  # surfaced by `alive` and the report, never swallowed
            if not worker.connection.stopped:
                log.exception("%s shard %s died", self.plan.config.name, worker.shard)
            self.errors.append((worker.index, e))

    @property
    def alive(self) -> bool:
        """True while every shard thread runs, the producer can still deliver and the
        run's lease (if any) still allows publishing."""
        return (
            all(t.is_alive() for t in self._threads)
            and not self.errors
            and self.publisher.check_sender()
            and self.publisher.fatal is None
            and self.publisher.fence_reason() is None
        )

    def extend(self, valid_until: float) -> None:
        """The lease was renewed: publishing is allowed until ``valid_until`` (``clock``)."""
        self.publisher.extend(valid_until)

    def fence_reason(self) -> str | None:
        """Why this ingestion may no longer publish (None: it may)."""
        return self.publisher.fence_reason()

    def fence(self, reason: str) -> str:
        """Stop publishing now, for good: no lane sends again, the shards stop reading and
        the producer drops what it has not sent. ``stop`` still joins and reports.
        Returns the reason in force (the first one given)."""
        for w in self.workers:
            w.stop()
        reason = self.publisher.fence(reason)
        self.publisher.abort()
        return reason

    def update_gauges(self) -> tuple[float, int]:
        """Set the venue-lag and in-flight gauges (the flow does this every second)."""
        lag_s = max((w.lag_us for w in self.workers), default=0) / 1e6
        inflight = self.publisher.in_flight
        self._lag.set(lag_s)
        self._inflight.set(inflight)
        venue, unsynced = self.plan.config.name, 0
        for w in self.workers:
            if w.books is None:
                continue
            for symbol, age in w.books.ages().items():
                if age is None:
                    unsynced += 1
                    if (venue, symbol) in _aged:  # no age for a book being rebuilt
                        BOOK_AGE.remove(venue, symbol)
                        _aged.discard((venue, symbol))
                else:
                    BOOK_AGE.labels(venue=venue, symbol=symbol).set(age)
                    _aged.add((venue, symbol))
        if "books" in self.plan.channels:
            BOOKS_OUT_OF_SYNC.labels(venue=venue).set(unsynced)
        return lag_s, inflight

    def progress(self) -> str:
        """One line for the log: rates since the last call, lag, reconnects, in-flight."""
        now = time.monotonic()
        frames = sum(w.connection.frames for w in self.workers)
        acked = sum(w.lane.acked for w in self.workers)
        t0, f0, a0 = self._last_progress
        self._last_progress = (now, frames, acked)
        dt = max(now - t0, 1e-9)
        lag_s, inflight = self.update_gauges()
        reconnects = sum(sum(w.connection.reconnects.values()) for w in self.workers)
        p = self.publisher.latency.percentiles(0.5, 0.99)
        self.publisher.latency.reset()
        latency = f", event->ack p50 {p[0]:.1f} ms p99 {p[1]:.1f} ms" if p else ""
        dlq = sum(w.lane.dead_letters for w in self.workers)
        repaired = sum(w.tracker.trades_repaired for w in self.workers if w.tracker)
        return (
            f"{self.plan.config.name}: {(frames - f0) / dt:.0f} frames/s in, "
            f"{(acked - a0) / dt:.0f} msg/s acked, lag {lag_s * 1000:.0f} ms{latency}, "
            f"reconnects {reconnects}, in-flight {inflight}/{self.publisher.max_in_flight}, "
            f"dlq {dlq}, repaired {repaired}"
        )

    def stop(self, flush_timeout_s: float = 30.0, join_timeout_s: float = 15.0) -> dict[str, Any]:
        """Stop reading, flush the producer, close sockets; returns the run's report."""
        for w in self.workers:
            w.stop()
        self.publisher.stop_waiting()  # wake readers blocked on a full in-flight buffer
        for t in self._threads:
            t.join(join_timeout_s)
        unresolved = self.publisher.close(flush_timeout_s)
        self._inflight.set(self.publisher.in_flight)
        return self.report(unresolved)

    def last_ids(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        for w in self.workers:
            if w.tracker is not None:
                ids.update(w.tracker.last)
        return ids

    def report(self, unresolved: int | None = None) -> dict[str, Any]:
        shards = [w.counts() for w in self.workers]
        totals = {k: sum(s[k] for s in shards) for k in _SUMMED}
        reconnects: Counter[str] = Counter()
        resyncs: Counter[str] = Counter()
        for s in shards:
            reconnects.update(s["reconnects"])
            resyncs.update(s["book_resyncs"])
        return {
            "run_id": self.run_id,
            "venue": self.plan.config.name,
            "symbols": self.symbols,
            "channels": list(self.plan.channels),
            "seconds": round(time.monotonic() - self._started, 3),
            **totals,
            "reconnects": dict(reconnects),
            "book_resyncs": dict(resyncs),
            "unresolved_at_exit": unresolved,
            "peak_in_flight": self.publisher.peak_in_flight,
            "max_in_flight": self.publisher.max_in_flight,
            "shard_errors": [f"shard {i}: {e!r}" for i, e in self.errors],
            "producer_error": repr(self.publisher.fatal) if self.publisher.fatal else None,
            "last_trade_ids": self.last_ids(),
            "shards": shards,
        }
