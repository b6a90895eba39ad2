"""Order-book events every venue's depth channel is parsed into, protocol-neutral.

They live with the adapters (not in ``tasks.books``) because the venue modules build
them and may import only ``core`` and ``venues``; the book stage reads them. Prices and
quantities are exact ``Decimal``s kept as the venue wrote them (``0.00100000`` keeps its
zeros), because Kraken's checksum is computed over those digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from tasks.core.codec import CodecError, parse_decimal
from tasks.venues.base import FeedError
from tasks.venues.parsing import decimal_text

Level = tuple[Decimal, Decimal]  # (price, quantity); quantity 0 deletes the level


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """The venue's whole book (to its depth) at one point of its update sequence.

    ``sequence``: Binance's ``lastUpdateId``, Coinbase's ``sequence_num``; None for
    Kraken, which numbers nothing and sends a ``checksum`` instead."""

    venue: str
    symbol: str  # canonical, e.g. BTC-USD
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    sequence: int | None = None
    checksum: int | None = None
    event_us: int | None = None  # None: the venue does not date it (REST, Kraken's)


@dataclass(frozen=True, slots=True)
class BookDelta:
    """Levels whose quantity changed (absolute quantities, not increments).

    ``first_seq``..``last_seq``: the update ids it covers (Binance ``U``..``u``;
    Coinbase's ``sequence_num`` for both); None for Kraken, which sends ``checksum``."""

    venue: str
    symbol: str
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    first_seq: int | None = None
    last_seq: int | None = None
    checksum: int | None = None
    event_us: int | None = None  # when the venue made the change (Binance E, Kraken timestamp)


def level(venue: str, what: str, price: Any, qty: Any) -> Level:
    """One (price, quantity) pair, checked by the codec's rules for an event's price
    (> 0) and size (>= 0): exact, finite and within the sizes any market has."""
    try:
        return (
            parse_decimal(f"{what} price", decimal_text(venue, f"{what} price", price), True),
            parse_decimal(f"{what} qty", decimal_text(venue, f"{what} qty", qty), False),
        )
    except CodecError as e:
        raise FeedError(f"{venue}: {e.reason}") from None


def update_id(venue: str, field: str, v: Any) -> int:
    """A non-negative integer update id or sequence number."""
    if type(v) is not int or v < 0:
        raise FeedError(f"{venue}: {field}: expected a non-negative integer, got {v!r:.60}")
    return v
