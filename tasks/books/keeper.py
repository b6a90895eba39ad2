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
Coinbase), and the shard hands the result back.

Memory per book: the sync machine's book (``keep`` levels a side; Binance's buffer at most
``max_buffer`` deltas) and the last published view (``depth`` levels a side).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from tasks.books.book import Book, Level
from tasks.books.sync import DEPTH, BinanceSync, CoinbaseSync, KrakenSync, Resync
from tasks.core.events import BookUpdate
from tasks.venues.depth import BookDelta, BookSnapshot

PROTOCOLS = ("binance", "kraken", "coinbase")
_ZERO = Decimal(0)
FETCH_RETRY_S = 1.0  # a REST snapshot that failed or was stale is asked again after this


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
        self.views = {s: _View() for s in self.symbols}
        self.resyncs: Counter[str] = Counter()  # reason -> count, since this keeper began
        self.snapshots = self.deltas = 0
        self._fetch_after: dict[str, float] = {}  # Binance: symbol -> when to fetch
        self._resubscribe: dict[str, None] = {}  # Kraken/Coinbase: symbols to resubscribe
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
            view.snapshot_us = None
        self._fetch_after.clear()
        self._resubscribe.clear()

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
        self._fetch_after.pop(snapshot.symbol, None)
        outcome = sync.on_snapshot(snapshot)
        out: list[BookUpdate] = []
        if outcome is not None:
            self._lost(snapshot.symbol, outcome)
        elif sync.synced and sync.last_applied is not None:
            self._publish(snapshot.symbol, sync.book, sync.last_applied.event_us, recv_us, out)
        return out

    def fetch_failed(self, symbol: str) -> None:
        """The REST snapshot could not be had: ask again after ``FETCH_RETRY_S``."""
        self._fetch_after[symbol] = time.monotonic() + FETCH_RETRY_S

    def due_fetches(self) -> list[str]:
        """Binance symbols whose REST snapshot the shard should fetch now."""
        now = time.monotonic()
        due = [s for s, after in self._fetch_after.items() if after <= now]
        for s in due:  # asked once; ``on_rest_snapshot`` or ``fetch_failed`` follows
            self._fetch_after[s] = float("inf")
        return due

    def take_resubscribe(self) -> list[str]:
        """Kraken/Coinbase symbols whose book the shard should resubscribe now."""
        symbols = list(self._resubscribe)
        self._resubscribe.clear()
        return symbols

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
        elif not sync.synced and event.symbol not in self._fetch_after:
            self._fetch_after[event.symbol] = 0.0  # buffered: the snapshot can come now

    def _kraken(self, event: BookSnapshot | BookDelta, recv_us: int, out: list) -> None:
        sync = self.kraken[event.symbol]
        if isinstance(event, BookSnapshot):
            self._resubscribe.pop(event.symbol, None)
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
        before = {s for s in self.symbols if sync.synced(s)}
        mine = [e for e in books if e.symbol in self.views]
        outcome = sync.on_frame(sequence, mine)
        if outcome is not None:
            self.resyncs[outcome.reason] += 1
            # after lost messages any book may be wrong, and a snapshot may be among them
            dropped = self.symbols if outcome.reason == "sequence_gap" else [
                s for s in before if not sync.synced(s)
            ]  # fmt: skip
            for s in dropped:
                self.views[s].snapshot_us = None
                self._resubscribe[s] = None
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

    def _lost(self, symbol: str, outcome: Resync) -> None:
        self.resyncs[outcome.reason] += 1
        self.views[symbol].snapshot_us = None
        if self.protocol == "binance":
            self._fetch_after[symbol] = time.monotonic() + (
                FETCH_RETRY_S if outcome.reason == "stale_snapshot" else 0.0
            )
        else:
            self._resubscribe[symbol] = None

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
        d_bids, d_asks = _diff(view.bids, bids), _diff(view.asks, asks)
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


def _diff(old: dict[Decimal, Decimal], new: list[Level]) -> list[Level]:
    """The levels of ``new`` whose quantity differs from ``old``, then ``old``'s levels
    that are gone (quantity 0)."""
    now = dict(new)
    changed = [(p, q) for p, q in new if old.get(p) != q]
    changed += [(p, _ZERO) for p in old if p not in now]
    return changed
