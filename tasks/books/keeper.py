"""From a venue's book channel to the book events ingestion publishes: one ``BookKeeper``
per WebSocket shard, fed every frame of its connection in order.

Guarantee (what consumers of ``market.books.raw`` are promised):

- every ``BookUpdate`` comes from a book its sync machine (``tasks.books.sync``) holds as
  exact at that moment; between a ``Resync`` and the snapshot that rebuilds the book,
  nothing of that book is published;
- per book, ``seq`` goes up by one per event, and a delta turns the previous event's view
  into the new one (``BookUpdate``'s contract);
- the first event after the book was (re)built, after ``snapshot_every_s`` of event time,
  or after one of its events failed to reach Kafka (``failed``), is a snapshot;
- events are dated by the venue: ``event_us`` is the time of the venue update that made
  the book so. A snapshot the venue does not date (REST, Kraken's) is not published on
  its own: the book is first published at its first dated update after a (re)build.

The keeper never does I/O. It says what the shard must do to rebuild a book: fetch a REST
snapshot (``due_fetches``, Binance) or resubscribe (``take_resubscribe``, Kraken and
Coinbase), and the shard hands the result back. A request that brings no rebuilt book
within ``REBUILD_WAIT_S`` (refused, lost, or a snapshot that fails again) is made again,
each time after a longer pause (``RETRY_S`` doubling up to ``MAX_RETRY_S``), so a venue
is never asked in a loop; the pause resets once the book is published again. A new
connection's books are expected within ``REBUILD_WAIT_S`` too, else they are asked for.

``seq`` starts at the keeper's creation time in microseconds: a later ingestion run's
events of the same book always carry higher numbers than an earlier run's, so a consumer
never applies a new run's delta to the old run's book.

Memory per book: the sync machine's book (``keep`` levels a side; Binance's buffer at most
``max_buffer`` deltas) and the last published view (``depth`` levels a side).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from tasks.books.book import Book, Level
from tasks.books.sync import (
    DEPTH,
    SEQUENCE_GAP,
    BinanceSync,
    CoinbaseSync,
    KrakenSync,
    Resync,
)
from tasks.core.events import BookUpdate
from tasks.venues.depth import BookDelta, BookSnapshot

PROTOCOLS = ("binance", "kraken", "coinbase")
_ZERO = Decimal(0)
RETRY_S = 1.0  # the pause before asking again for a book that failed to rebuild; doubles
MAX_RETRY_S = 60.0
REBUILD_WAIT_S = 10.0  # a request (or a new connection) that rebuilt nothing by then: again
FIRST_FETCH_S = 1.0  # Binance: a book no delta has started yet is fetched after this


def keep_levels(protocol: str, depth: int, subscribed: int | None = None) -> int:
    """Levels a side a book is kept at to publish ``depth`` of them exactly. Kraken: the
    subscribed depth (its checksum is over a book truncated to it). Binance and Coinbase
    send every level's changes: the book keeps 1000 levels (Binance's REST snapshot at
    limit 1000), so a price move must go through all of them before the published top is
    no longer known (``Book.exact``; the book is then rebuilt, reason ``depth``). 100
    levels were too few: the simulator's moves went through them within seconds."""
    if protocol == "kraken":
        return subscribed or depth
    return max(10 * depth, 1000)


@dataclass(slots=True)
class _View:
    """The last published state of one book."""

    seq: int = 0
    bids: dict[Decimal, Decimal] = field(default_factory=dict)
    asks: dict[Decimal, Decimal] = field(default_factory=dict)
    snapshot_us: int | None = None  # event time of the last snapshot; None: next is one
    updated_mono: float | None = None  # when the venue last changed the verified book


class BookKeeper:
    """The books of one shard: sync machines in, ``BookUpdate``s out."""

    def __init__(
        self,
        venue: str,
        protocol: str,
        symbols: Iterable[str],
        depth: int,
        *,
        keep: int,
        snapshot_every_s: float = 10.0,
        max_buffer: int = 1000,
        on_resync: Callable[[str, int], None] | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"no book procedure {protocol!r}; known: {PROTOCOLS}")
        if not 1 <= depth <= keep:
            raise ValueError(f"depth must be in [1, keep={keep}], got {depth}")
        if snapshot_every_s <= 0:
            raise ValueError(f"snapshot_every_s must be > 0, got {snapshot_every_s}")
        self.venue, self.protocol, self.depth, self.keep = venue, protocol, depth, keep
        self.symbols = list(dict.fromkeys(symbols))
        self.every_us = int(snapshot_every_s * 1_000_000)
        self.max_buffer = max_buffer
        self.on_resync = on_resync  # (reason, count so far): metrics and the log
        seq0 = time.time_ns() // 1000  # see the module docstring
        self.views = {s: _View(seq=seq0) for s in self.symbols}
        self.resyncs: Counter[str] = Counter()  # reason -> count, since this keeper began
        self.snapshots = self.deltas = 0
        self._due: dict[str, float] = {}  # symbol -> when to ask for its rebuild (monotonic)
        self._tries: Counter[str] = Counter()  # rebuild requests since it was last published
        self._start()

    def _start(self) -> None:
        """Fresh sync machines: nothing is trusted until each book is rebuilt."""
        if self.protocol == "binance":
            self.binance = {s: BinanceSync(self.keep, self.max_buffer) for s in self.symbols}
        elif self.protocol == "kraken":
            self.kraken = {s: KrakenSync(self.keep) for s in self.symbols}
        else:
            self.coinbase = CoinbaseSync(self.keep)
        for view in self.views.values():
            view.snapshot_us = view.updated_mono = None
        # Kraken and Coinbase send snapshots for the new subscription (asked again if they
        # do not come); Binance's books are fetched once the stream has begun buffering.
        wait = FIRST_FETCH_S if self.protocol == "binance" else REBUILD_WAIT_S
        now = time.monotonic()
        self._due = {s: now + wait for s in self.symbols}
        self._tries.clear()

    # -- what the shard calls ------------------------------------------------------------

    def on_connect(self) -> None:
        """A new connection: its subscription starts every book again (Kraken and
        Coinbase send snapshots; Binance's stream restarts and needs a REST snapshot)."""
        self._start()

    def on_frame(
        self, books: Sequence[BookSnapshot | BookDelta], sequence: int | None, recv_us: int
    ) -> list[BookUpdate]:
        """One frame's book events (and, for Coinbase, the number every frame of the
        connection carries, books or not); returns what to publish, in order."""
        if self.protocol == "coinbase":
            return self._coinbase(books, sequence, recv_us) if sequence is not None else []
        out: list[BookUpdate] = []
        for event in books:
            if event.symbol not in self.views:
                continue  # not this shard's (a venue echoing another subscription)
            if self.protocol == "binance":
                self._binance(event, recv_us, out)
            else:
                self._kraken(event, recv_us, out)
        return out

    def on_rest_snapshot(self, snapshot: BookSnapshot, recv_us: int) -> list[BookUpdate]:
        """A REST snapshot the shard fetched for a ``due_fetches`` symbol (Binance)."""
        sync = self.binance[snapshot.symbol]
        self._due.pop(snapshot.symbol, None)
        outcome = sync.on_snapshot(snapshot)
        out: list[BookUpdate] = []
        if outcome is not None:
            self._lost(snapshot.symbol, outcome)
        elif sync.synced and sync.last_applied is not None:
            self._publish(snapshot.symbol, sync.book, sync.last_applied.event_us, recv_us, out)
        return out

    def fetch_failed(self, symbol: str) -> None:
        """The REST snapshot could not be had: ask again after a pause."""
        self._ask(symbol)

    def due_fetches(self) -> list[str]:
        """Binance symbols whose REST snapshot the shard should fetch now."""
        return self._take_due() if self.protocol == "binance" else []

    def take_resubscribe(self) -> list[str]:
        """Kraken/Coinbase symbols whose book the shard should resubscribe now."""
        return self._take_due() if self.protocol != "binance" else []

    def _ask(self, symbol: str) -> None:
        """Ask for ``symbol``'s rebuild: now the first time, after a doubling pause when
        the previous requests rebuilt nothing."""
        tries = self._tries[symbol]
        pause = min(MAX_RETRY_S, RETRY_S * 2 ** (tries - 1)) if tries else 0.0
        self._due[symbol] = time.monotonic() + pause

    def _take_due(self) -> list[str]:
        now = time.monotonic()
        due = [s for s, when in self._due.items() if when <= now]
        for s in due:  # if nothing is rebuilt by then, it is due again
            self._tries[s] += 1
            self._due[s] = now + REBUILD_WAIT_S
        return due

    def failed(self, symbol: str) -> None:
        """One of ``symbol``'s events never reached Kafka: consumers saw a hole in its
        ``seq``, so the next event is a snapshot."""
        if symbol in self.views:
            self.views[symbol].snapshot_us = None

    def synced(self, symbol: str) -> bool:
        if self.protocol == "binance":
            return self.binance[symbol].synced
        if self.protocol == "kraken":
            return self.kraken[symbol].synced
        return self.coinbase.synced(symbol)

    def ages(self) -> dict[str, float | None]:
        """Seconds since each verified book last changed; None while one is not synced."""
        now = time.monotonic()
        return {
            s: (now - v.updated_mono) if v.updated_mono is not None and self.synced(s) else None
            for s, v in self.views.items()
        }

    # -- per protocol ------------------------------------------------------------------

    def _binance(self, event: BookSnapshot | BookDelta, recv_us: int, out: list) -> None:
        sync = self.binance[event.symbol]
        if isinstance(event, BookSnapshot):
            raise ValueError("Binance snapshots come over REST (on_rest_snapshot)")
        outcome = sync.on_delta(event)
        if outcome is not None:
            self._lost(event.symbol, outcome)
        elif sync.synced and sync.last_applied is event:
            self._publish(event.symbol, sync.book, event.event_us, recv_us, out)
        elif (
            not sync.synced
            and not self._tries[event.symbol]
            and self._due.get(event.symbol, 0.0) > time.monotonic()
        ):
            self._due[event.symbol] = 0.0  # buffered: the first snapshot can come now

    def _kraken(self, event: BookSnapshot | BookDelta, recv_us: int, out: list) -> None:
        sync = self.kraken[event.symbol]
        if isinstance(event, BookSnapshot):
            self._due.pop(event.symbol, None)
            self.views[event.symbol].snapshot_us = None
            outcome = sync.on_snapshot(event)
        elif not sync.synced:
            return  # after a resync, until the fresh snapshot
        else:
            outcome = sync.on_delta(event)
        if outcome is not None:
            self._lost(event.symbol, outcome)
        elif isinstance(event, BookDelta):
            self._publish(event.symbol, sync.book, event.event_us, recv_us, out)

    def _coinbase(
        self, books: Sequence[BookSnapshot | BookDelta], sequence: int, recv_us: int
    ) -> list[BookUpdate]:
        sync = self.coinbase
        mine = [e for e in books if e.symbol in self.views]
        touched = {e.symbol for e in mine}  # only a book the frame changed can end crossed
        for e in mine:
            if isinstance(e, BookSnapshot):
                self._due.pop(e.symbol, None)  # the (re)subscription answered
        outcome = sync.on_frame(sequence, mine)
        if outcome is not None:
            self._count(outcome)
            # after lost messages any book may be wrong, and a snapshot may be among them
            lost = self.symbols if outcome.reason == SEQUENCE_GAP else touched
            for s in lost:
                if not sync.synced(s) or outcome.reason == SEQUENCE_GAP:
                    sync.drop(s)
                    self._forget(s)
                    self._ask(s)
        out: list[BookUpdate] = []
        dated: dict[str, int] = {}
        for e in mine:
            if isinstance(e, BookSnapshot):
                self.views[e.symbol].snapshot_us = None
                dated.pop(e.symbol, None)
            elif e.event_us is not None and sync.synced(e.symbol):
                dated[e.symbol] = max(e.event_us, dated.get(e.symbol, 0))
        for symbol, event_us in dated.items():
            if sync.synced(symbol):
                self._publish(symbol, sync.books[symbol], event_us, recv_us, out)
        return out

    def _drop(self, symbol: str, outcome: Resync) -> None:
        """The sync machine holds the book as exact, but it cannot be published: forget it
        and rebuild it."""
        if self.protocol == "binance":
            self.binance[symbol].drop()
        else:
            self.coinbase.drop(symbol)
        self._lost(symbol, outcome)

    def _count(self, outcome: Resync) -> None:
        self.resyncs[outcome.reason] += 1
        if self.on_resync is not None:
            self.on_resync(outcome.reason, self.resyncs[outcome.reason])

    def _lost(self, symbol: str, outcome: Resync) -> None:
        self._count(outcome)
        self._forget(symbol)
        self._ask(symbol)

    def _forget(self, symbol: str) -> None:
        """The published view no longer stands: the next event is a snapshot, and the
        book has no age until it is rebuilt."""
        view = self.views[symbol]
        view.snapshot_us = view.updated_mono = None

    # -- publishing ----------------------------------------------------------------------

    def _publish(
        self, symbol: str, book: Book, event_us: int | None, recv_us: int, out: list
    ) -> None:
        """Append the event that takes consumers from the last published view to
        ``book``'s top ``depth`` levels, if anything there changed."""
        view = self.views[symbol]
        view.updated_mono = time.monotonic()
        if event_us is None:
            return  # undated: wait for the next dated update
        if self.protocol != "kraken" and not book.exact(self.depth):
            self._drop(symbol, Resync(DEPTH, f"the kept {self.keep} levels no longer cover it"))
            return
        bids, asks = book.top(self.depth)
        if view.snapshot_us is None or event_us - view.snapshot_us >= self.every_us:
            self._emit(view, symbol, "snapshot", bids, asks, bids, asks, event_us, recv_us, out)
            view.snapshot_us = event_us
            return
        d_bids, d_asks = diff(view.bids, bids), diff(view.asks, asks)
        if not d_bids and not d_asks:
            return  # the change was below the published depth
        if len(d_bids) > self.depth or len(d_asks) > self.depth:
            self._emit(view, symbol, "snapshot", bids, asks, bids, asks, event_us, recv_us, out)
            view.snapshot_us = event_us
            return
        self._emit(view, symbol, "delta", d_bids, d_asks, bids, asks, event_us, recv_us, out)

    def _emit(
        self,
        view: _View,
        symbol: str,
        kind: str,
        ev_bids: list[Level],
        ev_asks: list[Level],
        bids: list[Level],
        asks: list[Level],
        event_us: int,
        recv_us: int,
        out: list,
    ) -> None:
        view.seq += 1
        view.bids, view.asks = dict(bids), dict(asks)
        if kind == "snapshot":
            self.snapshots += 1
        else:
            self.deltas += 1
        event = BookUpdate(
            self.venue, symbol, kind, view.seq, self.depth, tuple(ev_bids), tuple(ev_asks),
            event_us, recv_us,
        )  # fmt: skip
        out.append(event)
        self._tries.pop(symbol, None)  # published again: the next failure asks at once


def diff(old: dict[Decimal, Decimal], new: list[Level]) -> list[Level]:
    """The levels of ``new`` whose quantity differs from ``old``, then ``old``'s levels
    that are gone (quantity 0)."""
    now = dict(new)
    changed = [(p, q) for p, q in new if old.get(p) != q]
    changed += [(p, _ZERO) for p in old if p not in now]
    return changed
