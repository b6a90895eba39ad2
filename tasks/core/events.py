"""The project's vocabulary: normalised market and user events.

Every venue adapter produces these, every sink consumes them. Prices and sizes are
``Decimal`` (never float). All times are integer epoch **microseconds** (``*_us``):
Binance gives milliseconds, Coinbase and Kraken give RFC 3339 with microseconds, and
microseconds keep all of them exact in one BIGINT.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

Side = Literal["buy", "sell"]
SIDES: frozenset[str] = frozenset({"buy", "sell"})
# A public trade's taker side, or "unknown" where the venue does not say (Finnhub's
# trades carry no side). Never guessed: "unknown" is stored as it is.
TradeSide = Literal["buy", "sell", "unknown"]
TRADE_SIDES: frozenset[str] = SIDES | {"unknown"}
# A user's transaction is a fill (buy/sell) or a deposit that funds the account.
TX_SIDES: frozenset[str] = SIDES | {"deposit"}
TX_STATUSES: frozenset[str] = frozenset({"filled", "cancelled", "rejected"})


class _Event(msgspec.Struct, frozen=True, gc=False):
    """Immutable, compared and hashed by value, like a frozen dataclass, but built in C:
    ingestion builds one per venue message, and a frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` a field) took 20 times the instructions. ``gc=False``: an event
    holds only strings, numbers and tuples of them, so it can never be part of a cycle,
    and the garbage collector need not track it."""


class Trade(_Event):
    """One public trade; ``side`` is the taker's side ("unknown" when the venue does
    not report it)."""

    venue: str
    symbol: str  # canonical, e.g. BTC-USDT
    venue_symbol: str  # as the venue spells it, e.g. BTCUSDT
    trade_id: int
    price: Decimal
    qty: Decimal
    side: TradeSide
    event_us: int
    recv_us: int

    @property
    def key(self) -> str:
        return self.symbol


class Quote(_Event):
    """Top of book. ``update_id`` is the venue's book sequence where it has one."""

    venue: str
    symbol: str
    venue_symbol: str
    update_id: int | None
    bid_price: Decimal
    bid_qty: Decimal
    ask_price: Decimal
    ask_qty: Decimal
    event_us: int
    recv_us: int

    @property
    def key(self) -> str:
        return self.symbol


class UserTransaction(_Event):
    """A user's fill on the trading platform; quote-asset fee. Keyed by user id.

    A ``deposit`` credits ``qty`` of the asset named by ``symbol`` (e.g. ``USDT``) at
    ``price`` 1, less ``fee`` in that asset.
    """

    tx_id: str
    user_id: str
    symbol: str
    side: Side | Literal["deposit"]
    qty: Decimal
    price: Decimal
    fee: Decimal
    status: str
    event_us: int

    @property
    def key(self) -> str:
        return self.user_id


class Candle(_Event):
    """OHLCV over [open_us, open_us + interval). ``source`` is 'trades' or 'venue'."""

    venue: str
    symbol: str
    interval: str
    open_us: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    trade_count: int
    vwap: Decimal
    source: str = "trades"

    @property
    def key(self) -> str:
        return self.symbol


BookLevel = tuple[Decimal, Decimal]  # (price, quantity)
BOOK_KINDS: frozenset[str] = frozenset({"snapshot", "delta"})


class BookUpdate(_Event):
    """One verified change of a book's top ``depth`` levels, as ingestion publishes it.

    ``kind`` "snapshot": the complete top ``depth`` levels per side (bids high to low,
    asks low to high, every quantity > 0). "delta": the levels of that top-``depth``
    view whose quantity changed since the previous event of this book, absolute
    quantities, 0 removing a level; applying it to the previous view and keeping the
    best ``depth`` levels per side gives the new view exactly.

    ``seq`` numbers the events of one book (venue, symbol) one by one: a delta always
    carries the previous event's ``seq`` + 1, so a consumer that sees anything else has
    missed one and waits for the next snapshot. A snapshot may jump (the book was
    rebuilt after a resync, or ingestion restarted) and always starts afresh.
    Only books ingestion has verified are published: none while one resyncs.
    """

    venue: str
    symbol: str
    kind: str  # "snapshot" | "delta"
    seq: int
    depth: int
    bids: tuple[BookLevel, ...]
    asks: tuple[BookLevel, ...]
    event_us: int
    recv_us: int

    @property
    def key(self) -> str:
        return self.symbol


Event = Trade | Quote | UserTransaction | Candle | BookUpdate


def split_symbol(symbol: str) -> tuple[str, str]:
    """BTC-USDT -> ('BTC', 'USDT')."""
    base, _, quote = symbol.partition("-")
    if not base or not quote:
        raise ValueError(f"not a canonical symbol: {symbol!r}")
    return base, quote
