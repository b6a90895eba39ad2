"""Parsing helpers every venue adapter shares, so each venue module is only its mapping.

Everything here raises ``FeedError`` naming the venue, the field and the value, because
that reason is what an operator reads in the DLQ. Numbers are exact: JSON numbers are
read as ``Decimal`` (never through float), and NaN/Infinity literals become non-finite
decimals that validation then rejects by name.

Frames are decoded by msgspec (a quarter of the standard library's CPU per frame, on
the path every message takes) with the same exact decimals; a frame it refuses is
decoded again by the standard library, whose extensions (NaN and Infinity literals,
unpaired surrogate escapes) and error texts are what adapters and their DLQ reasons
were written against.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import date
from decimal import Decimal
from typing import Any

import msgspec

from tasks.core.codec import CodecError, from_dict
from tasks.venues.base import FeedError, VenueConfig

_FAST = msgspec.json.Decoder(float_hook=Decimal)
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=Decimal)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
    r"(?:[Zz]|([+-])(\d\d):(\d\d))"
)


def loads(venue: str, raw: str | bytes) -> Any:
    """A frame's JSON with exact decimals; FeedError when it is not JSON."""
    try:
        return _FAST.decode(raw)
    except (ValueError, RecursionError, TypeError):  # DecodeError, a str msgspec can't encode
        pass  # not strict JSON, or not bytes/str: the standard library's verdict
    try:
        return _DECODER.decode(raw if type(raw) is str else str(raw, "utf-8"))
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, not text
        raise FeedError(f"{venue}: not JSON: {e}") from None
    except RecursionError:
        raise FeedError(f"{venue}: not JSON: nested too deeply") from None


def build(venue: str, what: str, wire: dict[str, Any]) -> Any:
    """Validate a wire dict with the codec's rules and build its Trade or Quote."""
    try:
        return from_dict(wire)
    except CodecError as e:
        symbol = wire.get("venue_symbol", wire.get("symbol"))
        raise FeedError(f"{venue} {what} {symbol!r:.40}: {e.reason}") from None


def ms_to_us(venue: str, field: str, v: Any) -> int:
    """Epoch milliseconds (JSON integer) -> epoch microseconds."""
    if type(v) is not int:
        raise FeedError(f"{venue}: {field}: expected integer epoch milliseconds, got {v!r:.60}")
    return v * 1000


def rfc3339_to_us(venue: str, field: str, v: Any) -> int:
    """'2023-02-09T20:19:35.39625135Z' -> epoch microseconds (digits past 6 truncated)."""
    m = _RFC3339.fullmatch(v) if type(v) is str else None
    if m is None:
        raise FeedError(f"{venue}: {field}: not an RFC 3339 timestamp: {v!r:.60}")
    y, mo, d, h, mi, s, frac, sign, oh, om = m.groups()
    try:
        days = date(int(y), int(mo), int(d)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise FeedError(f"{venue}: {field}: no such date: {v!r:.60}") from None
    if int(h) > 23 or int(mi) > 59 or int(s) > 60:  # 60: a leap second
        raise FeedError(f"{venue}: {field}: no such time of day: {v!r:.60}")
    seconds = ((days * 24 + int(h)) * 60 + int(mi)) * 60 + int(s)
    if sign:
        offset = (int(oh) * 60 + int(om)) * 60
        seconds += -offset if sign == "+" else offset
    return seconds * 1_000_000 + (int(frac[:6].ljust(6, "0")) if frac else 0)


def decimal_text(venue: str, field: str, v: Any) -> str:
    """A price or size as the codec's decimal string: a JSON string, or a JSON number
    that ``loads`` read exactly (Decimal or int)."""
    t = type(v)
    if t is str:
        return v
    if t is Decimal or t is int:
        return str(v)
    raise FeedError(f"{venue}: {field}: expected a decimal, got {v!r:.60}")


def split_concatenated(venue_symbol: str, quotes: tuple[str, ...]) -> tuple[str, str]:
    """'BTCUSDT' -> ('BTC', 'USDT') by the longest known quote-asset suffix.

    ``quotes`` must be ordered longest first. Ambiguous names (USDTUSD: USDT-USD or
    USD-TUSD?) are why adapters first consult the symbols they were asked to subscribe.
    """
    for q in quotes:
        if venue_symbol.endswith(q) and len(venue_symbol) > len(q):
            return venue_symbol[: -len(q)], q
    raise ValueError(f"no known quote asset ends {venue_symbol!r:.40}")


def shard(
    symbols: Iterable[str], streams_per_symbol: int, max_streams: int, shard_size: int | None
) -> list[list[str]]:
    """Split symbols (deduplicated, order kept) into connections of at most
    ``max_streams`` streams; ``shard_size`` (symbols per connection) may only shrink that."""
    if streams_per_symbol < 1:
        raise ValueError("at least one channel per symbol")
    per = max_streams // streams_per_symbol
    if shard_size is not None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        per = min(per, shard_size)
    if per < 1:
        raise ValueError(f"{streams_per_symbol} streams per symbol exceed {max_streams}")
    unique = list(dict.fromkeys(symbols))
    return [unique[i : i + per] for i in range(0, len(unique), per)]


def missing(venue: str, what: str, error: KeyError) -> FeedError:
    """The FeedError for a field a frame lacks: "<venue> <what>: missing field '<key>'"."""
    return FeedError(f"{venue} {what}: missing field {error}")


class missing_fields:
    """Inside the block, a field the frame lacks (``KeyError``) becomes ``FeedError``
    ``missing`` words. A class, not a generator: it runs per frame. (The busiest paths
    catch the KeyError themselves: a ``try`` costs nothing until it raises.)"""

    __slots__ = ("venue", "what")

    def __init__(self, venue: str, what: str):
        self.venue, self.what = venue, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if kind is KeyError:
            raise missing(self.venue, self.what, error) from None  # type: ignore[arg-type]
        return False


class bad_rows:
    """Inside the block, a REST row of the wrong shape (missing or mistyped fields,
    unparseable numbers) becomes ``FeedError`` "<venue> <what>: bad row (...)"; a
    ``FeedError`` raised inside passes as it is."""

    __slots__ = ("row", "venue", "what")

    def __init__(self, venue: str, what: str, row: Any):
        self.venue, self.what, self.row = venue, what, row

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if kind is None or issubclass(kind, FeedError):
            return False
        if issubclass(kind, (LookupError, TypeError, AttributeError, ValueError, ArithmeticError)):
            raise FeedError(
                f"{self.venue} {self.what}: bad row ({error!r}): {self.row!r:.200}"
            ) from None
        return False


class Adapter:
    """What every venue adapter shares: its config and name, sharding by stream count,
    exact decimal fields and canonical symbols that fail as ``FeedError``."""

    channels: tuple[str, ...] = ("trades", "quotes")
    symbol_field = "symbol"  # the frame field ``_symbol`` reads, named in its errors

    def __init__(self, config: VenueConfig):
        self.config = config
        self.name = config.name

    def to_canonical(self, venue_symbol: str) -> str:
        raise NotImplementedError

    def shards(
        self, symbols: list[str], channels: list[str], shard_size: int | None = None
    ) -> list[list[str]]:
        """Symbols per connection: each carries at most max_streams_per_connection streams
        (and at most ``shard_size`` symbols when given)."""
        return shard(symbols, len(channels), self.config.max_streams_per_connection, shard_size)

    def _dec(self, obj: dict[str, Any], field: str) -> str:
        return decimal_text(self.name, field, obj[field])

    def _symbol(self, value: Any) -> str:
        try:
            return self.to_canonical(value)
        except (ValueError, AttributeError):
            raise FeedError(
                f"{self.name}: {self.symbol_field}: not a {self.symbol_kind}: {value!r:.60}"
            ) from None

    symbol_kind = "symbol"
