"""Keeping a local book in step with a venue: one state machine per venue protocol.

Each machine takes the venue's parsed book events (``tasks.venues.depth``) in the order
they arrived and returns None while its book is exact, or a ``Resync`` saying why the
book can no longer be trusted. A resync empties the book and leaves the machine waiting
for a fresh snapshot (the caller fetches or resubscribes); until then ``synced`` is
False and nothing should be read from the book. ``Resync.reason`` is one of ``REASONS``:
short, stable strings meant as metric labels.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from tasks.books.book import Book
from tasks.venues.depth import BookDelta, BookSnapshot

SEQUENCE_GAP = "sequence_gap"  # an update went missing
STALE_SNAPSHOT = "stale_snapshot"  # the snapshot predates every buffered update
BUFFER_FULL = "buffer_full"  # too many updates waited for a snapshot
CHECKSUM = "checksum"  # the venue's checksum disagrees with our book
CROSSED = "crossed"  # best bid >= best ask: our book lost an update
DEPTH = "depth"  # the kept levels no longer cover the published top (``Book.exact``)
REASONS = (SEQUENCE_GAP, STALE_SNAPSHOT, BUFFER_FULL, CHECKSUM, CROSSED, DEPTH)


@dataclass(frozen=True, slots=True)
class Resync:
    """The book is out of sync and needs a fresh snapshot; ``reason`` is in ``REASONS``."""

    reason: str
    detail: str = ""


class BinanceSync:
    """One symbol's book from Binance's diff depth stream and a REST snapshot, following
    Binance's "How to manage a local order book correctly".

    Deltas are buffered (each ``U`` following the previous ``u``) until a snapshot with
    ``lastUpdateId`` L arrives; buffered deltas with ``u <= L`` are dropped, the first
    applied one must straddle the snapshot (``U <= L+1 <= u``) and every later one must
    start where the previous ended (``U == u + 1``). Any break is a resync, and the delta
    that revealed it starts the new buffer, so the stream never has to be reopened.
    """

    def __init__(self, depth: int, max_buffer: int = 1000):
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {max_buffer}")
        self.book = Book(depth)
        self.max_buffer = max_buffer
        self.update_id: int | None = None  # the book's last applied u; None: not synced
        self._first = False  # the next delta is the first after the snapshot
        self._buffer: list[BookDelta] = []
        self.last_applied: BookDelta | None = None  # the delta the book last took, if synced

    @property
    def synced(self) -> bool:
        return self.update_id is not None

    def on_delta(self, delta: BookDelta) -> Resync | None:
        first, last = _ids(delta)
        if self.update_id is None:
            return self._buffered(delta, first)
        if self._first:
            if last <= self.update_id:
                return None  # older than the snapshot: already in it
            if first > self.update_id + 1:
                return self._lost([delta], SEQUENCE_GAP, f"U={first} > lastUpdateId+1")
            self._first = False
        elif first != self.update_id + 1:
            return self._lost([delta], SEQUENCE_GAP, f"U={first} after u={self.update_id}")
        self.book.apply(delta.bids, delta.asks)
        self.update_id, self.last_applied = last, delta
        if self.book.crossed():
            return self._lost([delta], CROSSED, f"after u={last}")
        return None

    def on_snapshot(self, snapshot: BookSnapshot) -> Resync | None:
        """Apply a REST snapshot, then the buffered deltas it does not already hold."""
        if snapshot.sequence is None:
            raise ValueError("a Binance snapshot carries lastUpdateId")
        last_id = snapshot.sequence
        pending = [d for d in self._buffer if _ids(d)[1] > last_id]
        # The buffer is contiguous, so a hole before the first pending delta means
        # nothing was dropped: the snapshot is older than everything buffered.
        if pending and _ids(pending[0])[0] > last_id + 1:
            return Resync(STALE_SNAPSHOT, f"lastUpdateId={last_id} < U-1={_ids(pending[0])[0] - 1}")
        self.book.replace(snapshot.bids, snapshot.asks)
        self.update_id, self._first, self._buffer = last_id, True, []
        self.last_applied = None
        if self.book.crossed():
            return self._lost(pending, CROSSED, f"snapshot lastUpdateId={last_id}")
        outcome = None
        for delta in pending:  # after a resync the rest are buffered again
            result = self.on_delta(delta)
            outcome = outcome or result
        return outcome

    def _buffered(self, delta: BookDelta, first: int) -> Resync | None:
        if self._buffer and first != _ids(self._buffer[-1])[1] + 1:
            self._buffer = [delta]
            return Resync(SEQUENCE_GAP, f"buffered U={first} does not follow the buffer")
        if len(self._buffer) >= self.max_buffer:
            self._buffer = [delta]
            return Resync(BUFFER_FULL, f"{self.max_buffer} deltas waited for a snapshot")
        self._buffer.append(delta)
        return None

    def drop(self) -> None:
        """Forget the book (the caller found it unusable): the next deltas are buffered
        for a fresh snapshot."""
        self._lost([], DEPTH, "dropped")

    def _lost(self, buffer: list[BookDelta], reason: str, detail: str) -> Resync:
        """Drop the book; ``buffer`` (contiguous deltas still to come after a snapshot)
        waits for the next one."""
        self.book.replace((), ())
        self.update_id, self._first, self._buffer = None, False, buffer
        self.last_applied = None
        return Resync(reason, detail)


def _ids(delta: BookDelta) -> tuple[int, int]:
    if delta.first_seq is None or delta.last_seq is None:
        raise ValueError("a Binance delta carries U and u")
    return delta.first_seq, delta.last_seq


KRAKEN_CHECKSUM_LEVELS = 10


def kraken_checksum(book: Book) -> int:
    """Kraken's v2 book checksum: CRC32 (unsigned) of the top 10 asks low to high, then
    the top 10 bids high to low, each level as price then quantity written with the
    '.' removed and leading zeros stripped."""
    bids, asks = book.top(KRAKEN_CHECKSUM_LEVELS)
    text = "".join(_digits(p) + _digits(q) for p, q in (*asks, *bids))
    return zlib.crc32(text.encode("ascii"))


def _digits(value: Decimal) -> str:
    # format 'f' never uses an exponent, and keeps the trailing zeros the venue sent.
    return format(value, "f").replace(".", "").lstrip("0")


class KrakenSync:
    """One pair's book from Kraken's WebSocket v2 ``book`` channel.

    The book is capped at the subscribed depth (Kraken sends no deletion for a level
    that falls out of scope), and after the snapshot and every update its checksum must
    equal the one Kraken sent. Updates before a snapshot are ignored: the subscription
    (or resubscription) that a resync asks for always starts with one.
    """

    def __init__(self, depth: int):
        if depth < KRAKEN_CHECKSUM_LEVELS:
            raise ValueError(f"a Kraken book holds at least 10 levels, got depth {depth}")
        self.book = Book(depth)
        self.synced = False

    def on_snapshot(self, snapshot: BookSnapshot) -> Resync | None:
        self.book.replace(snapshot.bids, snapshot.asks)
        self.synced = True
        return self._verify(snapshot.checksum)

    def on_delta(self, delta: BookDelta) -> Resync | None:
        if not self.synced:
            return None
        self.book.apply(delta.bids, delta.asks)
        return self._verify(delta.checksum)

    def _verify(self, expected: int | None) -> Resync | None:
        ours = kraken_checksum(self.book)
        if ours != expected:
            return self._lost(CHECKSUM, f"ours {ours}, Kraken's {expected}")
        if self.book.crossed():
            return self._lost(CROSSED, f"bid {self.book.best_bid()} ask {self.book.best_ask()}")
        return None

    def _lost(self, reason: str, detail: str) -> Resync:
        self.book.replace((), ())
        self.synced = False
        return Resync(reason, detail)


class CoinbaseSync:
    """The books of one Coinbase Advanced Trade connection's ``level2`` channel.

    ``sequence_num`` numbers every message of a connection, whatever its channel, so
    feed every frame's number (heartbeats too, with no events): a number that is not
    the previous one plus one means messages were lost, and since any of them may have
    changed any book, every book of the connection is dropped. A snapshot (re)starts
    its product's book; updates for a product without one are ignored until it comes.
    """

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.books: dict[str, Book] = {}
        self.sequence: int | None = None

    def synced(self, symbol: str) -> bool:
        return symbol in self.books

    def drop(self, symbol: str) -> None:
        """Forget ``symbol``'s book (the caller found it unusable) until its next snapshot."""
        self.books.pop(symbol, None)

    def on_frame(
        self, sequence: int, events: Sequence[BookSnapshot | BookDelta] = ()
    ) -> Resync | None:
        outcome = None
        if self.sequence is not None and sequence != self.sequence + 1:
            self.books.clear()
            outcome = Resync(SEQUENCE_GAP, f"sequence_num {sequence} after {self.sequence}")
        # a late (lower) number is one gap, not two: the next in-order frame follows the max
        self.sequence = sequence if self.sequence is None else max(self.sequence, sequence)
        touched = []
        for event in events:
            book = self.books.get(event.symbol)
            if isinstance(event, BookSnapshot):
                book = self.books[event.symbol] = Book(self.depth)
                book.replace(event.bids, event.asks)
            elif book is not None:
                book.apply(event.bids, event.asks)
            if book is not None:
                touched.append(event.symbol)
        for symbol in dict.fromkeys(touched):
            if self.books[symbol].crossed():
                del self.books[symbol]
                outcome = outcome or Resync(CROSSED, f"{symbol} at sequence_num {sequence}")
        return outcome
