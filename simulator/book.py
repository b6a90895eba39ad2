"""One symbol's L2 order book: the truth every venue's book channel shows.

Why this shape: the platform's book-sync code has to be proven against a book whose
every state can be asked for again, so each venue protocol (Binance diff depth + REST
snapshot, Kraken v2 ``book`` with its checksum, Coinbase ``level2``) formats the same
per-symbol truth, and ``book_at`` answers what it was at any recent event time.

The book follows the market's published quotes (``QuoteRow``: every trade executes at
the touch, and every touch move or size change is a quote row), so its best bid/ask and
their sizes are exactly the last quote's. Around the touch it holds ``LEVELS`` to
``MAX_LEVELS`` levels a side; deeper levels change by a seeded RNG drawn once per quote
row, so the content is fixed by the seed and the quote row at which the book was first
asked for (``SimConfig.books`` starts every book with the market: the seed alone).

Changes are coalesced so that each book update (contiguous ``update_id`` per symbol)
has a strictly increasing millisecond event time. The last ``history`` updates keep the
quantities they replaced, so a past state is the current one with newer updates undone:
memory is bounded and ``at()`` costs the number of updates undone.

Prices and sizes are integers in the market's units (``10**-price_dp``, ``10**-qty_dp``).
Nothing here runs for a symbol whose book nobody asked for (``book_of`` creates it).
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right, insort
from collections import deque
from decimal import Decimal
from typing import NamedTuple

from simulator.market import _TABLE_SIZE, Market, QuoteRow

LEVELS = 160  # levels a side the book is refilled to
MAX_LEVELS = 200  # levels a side beyond which the far end is cancelled back to LEVELS
NOISE_DEPTH = 30  # deep-level changes land within this many levels of the touch
HISTORY = 20_000  # book updates kept per symbol for ``at``


class BookUpdate(NamedTuple):
    """One coalesced change: the levels it touched, with the quantities they replaced
    (0: the level did not exist). Their new quantities are the book's, or the previous
    state's when undone."""

    update_id: int
    event_ms: int
    bids: tuple[tuple[int, int], ...]  # (price, old qty)
    asks: tuple[tuple[int, int], ...]


class Levels(NamedTuple):
    update_id: int
    event_ms: int
    bids: list[tuple[int, int]]  # best (highest) first
    asks: list[tuple[int, int]]  # best (lowest) first


class _Side:
    """price -> qty, with the prices kept sorted ascending."""

    __slots__ = ("prices", "qty")

    def __init__(self) -> None:
        self.qty: dict[int, int] = {}
        self.prices: list[int] = []

    def set(self, price: int, qty: int, old: dict[int, int]) -> None:
        """Set one level (0 deletes), remembering in ``old`` what it was before the
        update under way."""
        prev = self.qty.get(price, 0)
        if prev == qty:
            return
        old.setdefault(price, prev)
        if qty:
            if not prev:
                insort(self.prices, price)
            self.qty[price] = qty
        else:
            del self.qty[price]
            del self.prices[bisect_left(self.prices, price)]

    def copy(self) -> dict[int, int]:
        return dict(self.qty)


class OrderBook:
    def __init__(self, market: Market, history: int = HISTORY):
        self.market = market
        m = market
        self.tick = m.tick
        self._lots = m._level_lots  # the market's own level-size table
        self._rnd = random.Random(f"{m.params.seed}:{m.symbol}:book:{m.update_id}").random
        self.bids, self.asks = _Side(), _Side()
        self.update_id = m.update_id  # the first update is this + 1
        self.event_ms = m.last_ms
        self.history: deque[BookUpdate] = deque(maxlen=history)
        self.base_ms = self.event_ms  # event time of the state before the oldest kept update
        q = m.quote(m.last_ms)
        scratch: dict[int, int] = {}
        self.bids.set(q.bid, q.bid_qty, scratch)
        self.asks.set(q.ask, q.ask_qty, scratch)
        self._refill(scratch, scratch)

    # ---- change -------------------------------------------------------------------------

    def apply(self, quotes: list[QuoteRow]) -> list[BookUpdate]:
        """Move the book through ``quotes`` (in order), one update per distinct
        millisecond (an update never shares or precedes the previous one's)."""
        out: list[BookUpdate] = []
        old_b: dict[int, int] = {}
        old_a: dict[int, int] = {}
        group_ms = -1
        for q in quotes:
            if q.ts_ms > group_ms:
                self._close(group_ms, old_b, old_a, out)
                old_b, old_a = {}, {}
                group_ms = max(q.ts_ms, self.event_ms + 1)
            self._quote(q, old_b, old_a)
        self._close(group_ms, old_b, old_a, out)
        return out

    def _close(self, ms: int, old_b: dict, old_a: dict, out: list[BookUpdate]) -> None:
        bids = tuple((p, o) for p, o in old_b.items() if self.bids.qty.get(p, 0) != o)
        asks = tuple((p, o) for p, o in old_a.items() if self.asks.qty.get(p, 0) != o)
        if not bids and not asks:
            return
        self.update_id += 1
        self.event_ms = ms
        up = BookUpdate(self.update_id, ms, bids, asks)
        hist = self.history
        if len(hist) == hist.maxlen:
            self.base_ms = hist[0].event_ms  # the oldest state ``at`` can still rebuild
        hist.append(up)
        out.append(up)

    def _quote(self, q: QuoteRow, old_b: dict[int, int], old_a: dict[int, int]) -> None:
        bids, asks = self.bids, self.asks
        # the touch moved in: levels better than the new best are gone (taken or pulled)
        for p in bids.prices[bisect_right(bids.prices, q.bid) :]:
            bids.set(p, 0, old_b)
        for p in asks.prices[: bisect_left(asks.prices, q.ask)]:
            asks.set(p, 0, old_a)
        bids.set(q.bid, q.bid_qty, old_b)
        asks.set(q.ask, q.ask_qty, old_a)
        self._noise(old_b, old_a)
        self._refill(old_b, old_a)

    def _noise(self, old_b: dict[int, int], old_a: dict[int, int]) -> None:
        """One change below the touch: a new size, a cancel, or a new level in a hole."""
        r = self._rnd
        buy = r() < 0.5
        side, old = (self.bids, old_b) if buy else (self.asks, old_a)
        prices = side.prices
        n = min(len(prices), NOISE_DEPTH)
        k = 1 + int(r() * (n - 1)) if n > 1 else 0
        what = r()
        lots = self._lots[int(r() * _TABLE_SIZE)]
        if not k:
            return
        price = prices[-1 - k] if buy else prices[k]
        if what < 0.15:
            side.set(price, 0, old)
        elif what < 0.35:
            step = -self.tick if buy else self.tick
            gap = price - step  # toward the touch
            if gap not in side.qty and gap > 0:
                side.set(gap, lots, old)
        else:
            side.set(price, lots, old)

    def _refill(self, old_b: dict[int, int], old_a: dict[int, int]) -> None:
        r, tick, lots = self._rnd, self.tick, self._lots
        for side, old, sign in ((self.bids, old_b, -1), (self.asks, old_a, 1)):
            prices = side.prices
            if len(prices) > MAX_LEVELS:
                far = prices[:-LEVELS] if sign < 0 else prices[LEVELS:]
                for p in far:
                    side.set(p, 0, old)
            while len(prices) < LEVELS:
                edge = prices[0] if sign < 0 else prices[-1]
                p = edge + sign * tick * (2 if r() < 0.1 else 1)
                if p <= 0:
                    break
                side.set(p, lots[int(r() * _TABLE_SIZE)], old)

    # ---- reading ------------------------------------------------------------------------

    def top(self, depth: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The best ``depth`` levels a side now: (bids high to low, asks low to high)."""
        bq, aq = self.bids.qty, self.asks.qty
        bp, ap = self.bids.prices, self.asks.prices
        return (
            [(p, bq[p]) for p in bp[: -depth - 1 : -1]],
            [(p, aq[p]) for p in ap[:depth]],
        )

    def at(self, event_ms: int, depth: int) -> Levels:
        """The top ``depth`` levels as of the newest update with event time <= event_ms.
        ValueError when that state is older than the history kept."""
        bids, asks = self.bids.copy(), self.asks.copy()
        uid, ms = self.update_id, self.event_ms
        hist = self.history
        i = len(hist) - 1
        while ms > event_ms:
            if i < 0:
                raise ValueError(
                    f"{self.market.symbol}: no book state at {event_ms} ms: the oldest kept"
                    f" is update {uid} at {ms} ms"
                )
            up = hist[i]
            _undo(bids, up.bids)
            _undo(asks, up.asks)
            uid = up.update_id - 1
            ms = hist[i - 1].event_ms if i > 0 else self.base_ms
            i -= 1
        return Levels(
            uid,
            ms,
            sorted(bids.items(), reverse=True)[:depth],
            sorted(asks.items())[:depth],
        )

    def decimals(self, levels: list[tuple[int, int]]) -> list[list[Decimal]]:
        m = self.market
        return [[Decimal(p).scaleb(-m.price_dp), Decimal(q).scaleb(-m.qty_dp)] for p, q in levels]


def _undo(side: dict[int, int], changes: tuple[tuple[int, int], ...]) -> None:
    for price, old in changes:
        if old:
            side[price] = old
        else:
            side.pop(price, None)


def book_of(market: Market) -> OrderBook:
    """The market's book, created on first demand (the pacing loop only moves books
    that exist, so symbols nobody asked a book of cost nothing)."""
    book = market.book
    if book is None:
        book = market.book = OrderBook(market)
    return book
