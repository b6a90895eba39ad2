"""An L2 order book: per side, price -> quantity, exact ``Decimal``s, capped in depth.

Guarantee: every level the book holds carries the quantity the venue last sent for it
(venues send absolute quantities, so a level is never the sum of guesses), quantity 0
deletes a level, and each side never holds more than ``depth`` levels: after every
change the worst levels beyond the cap are dropped.

Why dropping is safe, and where it is not:

- Kraken: the cap *is* the protocol. Set ``depth`` to the subscribed depth; Kraken sends
  no deletion for a level pushed out of scope and documents that the client must
  truncate, so its checksum only matches a book truncated this way.
- Binance and Coinbase send every level's changes (Binance's REST snapshot itself stops
  at its ``limit``). A level dropped by the cap is gone until the venue changes it
  again; when the levels before it are then deleted (a price move through the whole
  window), the book has holes where levels exist. So each side remembers its ``limit``:
  the best price that may be missing (the best level ever dropped, or the worst level of
  a snapshot that filled the window: the venue may have cut it there). Every level
  strictly better than the limit is exact; ``exact(n)`` says whether the best ``n`` are
  all such, and when they are not, only a fresh snapshot helps.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable
from decimal import Decimal

Level = tuple[Decimal, Decimal]


class _Side:
    """One side's levels, kept sorted ascending by price (bids are read from the end)."""

    __slots__ = ("levels", "limit", "prices", "reverse")

    def __init__(self, reverse: bool):
        self.levels: dict[Decimal, Decimal] = {}
        self.prices: list[Decimal] = []  # ascending
        self.reverse = reverse  # bids: best is the highest price
        self.limit: Decimal | None = None  # the best price that may be missing (None: none)

    def set(self, price: Decimal, qty: Decimal) -> None:
        if qty == 0:
            if self.levels.pop(price, None) is not None:
                del self.prices[bisect_left(self.prices, price)]
        elif price in self.levels:
            # Keep the price as the venue first wrote it; the quantity as it last wrote it.
            self.levels[price] = qty
        else:
            self.levels[price] = qty
            insort(self.prices, price)

    def truncate(self, depth: int) -> None:
        extra = len(self.prices) - depth
        if extra <= 0:
            return
        worst = self.prices[:extra] if self.reverse else self.prices[-extra:]
        for price in worst:
            del self.levels[price]
        self.cut(worst[-1] if self.reverse else worst[0])
        if self.reverse:
            del self.prices[:extra]
        else:
            del self.prices[-extra:]

    def cut(self, price: Decimal) -> None:
        """Levels at ``price`` and beyond may be missing from now on."""
        if self.limit is None or (price > self.limit if self.reverse else price < self.limit):
            self.limit = price

    def exact(self, n: int) -> bool:
        """The best ``n`` levels are all strictly better than the limit (and there are
        ``n``, unless nothing was ever cut)."""
        if self.limit is None:
            return True
        best = self.top(n)
        if len(best) < n:
            return False
        worst = best[-1][0]
        return worst > self.limit if self.reverse else worst < self.limit

    def top(self, n: int) -> list[Level]:
        best = self.prices[: -n - 1 : -1] if self.reverse else self.prices[:n]
        return [(p, self.levels[p]) for p in best]

    def best(self) -> Decimal | None:
        if not self.prices:
            return None
        return self.prices[-1] if self.reverse else self.prices[0]


class Book:
    """One symbol's L2 book, at most ``depth`` levels per side."""

    def __init__(self, depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._bids = _Side(reverse=True)
        self._asks = _Side(reverse=False)

    def replace(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Become the snapshot ``bids``/``asks`` (levels of quantity 0 are skipped). A
        side that fills the window (``depth`` levels or more) may have been cut by the
        venue: its worst level becomes the side's limit."""
        self._bids, self._asks = _Side(reverse=True), _Side(reverse=False)
        self.apply(bids, asks)
        for side in (self._bids, self._asks):
            if len(side.prices) >= self.depth:
                side.cut(side.prices[0] if side.reverse else side.prices[-1])

    def apply(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Set each level's quantity in order (0 deletes it), then drop levels beyond
        the depth. Truncating once after all changes matters for Kraken: a level pushed
        out mid-message may be pulled back in by a later deletion in the same message."""
        for price, qty in bids:
            self._bids.set(price, qty)
        for price, qty in asks:
            self._asks.set(price, qty)
        self._bids.truncate(self.depth)
        self._asks.truncate(self.depth)

    def bids(self, n: int | None = None) -> list[Level]:
        """The best ``n`` bids (all when None), highest price first."""
        return self._bids.top(self.depth if n is None else n)

    def asks(self, n: int | None = None) -> list[Level]:
        """The best ``n`` asks (all when None), lowest price first."""
        return self._asks.top(self.depth if n is None else n)

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """The best ``n`` levels of each side: (bids high to low, asks low to high)."""
        return self.bids(n), self.asks(n)

    def exact(self, n: int) -> bool:
        """The best ``n`` levels of each side are known to be the venue's (see the
        module docstring): False once a price move went through the kept window."""
        return self._bids.exact(n) and self._asks.exact(n)

    def best_bid(self) -> Decimal | None:
        return self._bids.best()

    def best_ask(self) -> Decimal | None:
        return self._asks.best()

    def spread(self) -> Decimal | None:
        """Best ask - best bid; None while a side is empty."""
        bid, ask = self.best_bid(), self.best_ask()
        return None if bid is None or ask is None else ask - bid

    def mid(self) -> Decimal | None:
        """(best bid + best ask) / 2 (exact to Decimal's 28 digits); None while a side
        is empty."""
        bid, ask = self.best_bid(), self.best_ask()
        return None if bid is None or ask is None else (bid + ask) / 2

    def crossed(self) -> bool:
        """Best bid at or above best ask: a book no matching engine can show (a locked
        book counts too), so ours has lost an update."""
        bid, ask = self.best_bid(), self.best_ask()
        return bid is not None and ask is not None and bid >= ask

    def __len__(self) -> int:
        return len(self._bids.prices) + len(self._asks.prices)
