"""Versioned JSON codec for the events in ``tasks.core.events``.

Wire format (version 1): one JSON object per Kafka message, ``{"v": 1, "t": <type>,
...fields}``; decimals travel as JSON strings so no consumer can read them as floats,
times as integers (epoch microseconds). ``decode`` validates; anything it rejects raises
``CodecError`` whose ``reason`` is what the DLQ record carries. Decoding never raises
anything else.

Sizes are part of the format: every string, decimal and integer field and the message
itself have a maximum (the constants below), so whatever the codec accepts every sink
stores (PostgreSQL ``text``/``numeric`` columns and their indexes, MongoDB documents) and
wallet arithmetic computes exactly. ``from_dict`` enforces them, and with it ``decode``,
``validate`` and every venue adapter.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from json.encoder import encode_basestring
from operator import attrgetter, call, index
from typing import Any

from tasks.core.events import (
    BOOK_KINDS,
    TRADE_SIDES,
    TX_SIDES,
    TX_STATUSES,
    BookUpdate,
    Candle,
    Event,
    Quote,
    Trade,
    UserTransaction,
)

VERSION = 1
# Times outside [2009-01-03, now + 1 day] are absurd for crypto market data.
MIN_TIME_US = 1_230_940_800_000_000
MAX_FUTURE_US = 86_400_000_000
# Integers (trade_id, update_id, trade_count) are PostgreSQL BIGINTs: signed 64-bit.
MAX_ID = 2**63 - 1

# -- size limits ---------------------------------------------------------------------------
# Strings, in characters (str length). Bytes need no limit of their own: UTF-8 takes at
# most 4 per character, so the widest index row, the candles key (venue, symbol,
# interval, open_us), holds at most 4 * (32 + 64 + 16) + 8 = 456 bytes of data, far
# under btree's 2,704-byte maximum (a 3,000-character symbol broke it), and a MongoDB _id
# (tx_id; wallets' "user_id:asset") stays under 600 bytes.
MAX_CHARS: dict[str, int] = {
    "venue": 32,  # registry names (binance ... deribit) and their -sim forms
    "symbol": 64,  # canonical BASE-QUOTE; real assets are <= 12 characters each
    "venue_symbol": 64,  # the venue's spelling: BTCUSDT, XBT/USD, 1000SATSUSDT
    "interval": 16,  # 1m, 15m, 4h, 1d (tasks.analytics.candles allows <= 6 characters)
    "source": 32,  # 'trades' or 'venue'
    "tx_id": 128,  # a uuid4 hex is 32; exchange order ids are at most ~64
    "user_id": 128,  # a uuid or an account id, with room for a prefix
}
# Decimals, as ``Decimal`` reads them: coefficient digits and exponent (value =
# coefficient * 10**exponent). Real data is far inside: Binance prints 8 decimals
# ("0.00000001", "123456789.12345678": 17 digits), Coinbase and Kraken at most 10, a
# candle's VWAP has 28 significant digits (VWAP_CONTEXT in tasks.analytics.candles and
# tasks.venues.binance), volumes are exact sums of sizes. Together these make wallet
# arithmetic exact (tasks.core.wallets.EXACT, 100 digits): qty * price has at most
# 2 * 40 = 80 digits, and notional +- fee spans at most 100 places, the most when two
# amounts at exponent -40 meet a fee just under 1e19 (places 10**-80 .. 10**19, with a
# carry). PostgreSQL's numeric takes 131,072 digits before the point and 16,383 after
# (17,000 decimals overflowed it); no price or size column is in an index.
MAX_DIGITS = 40  # significant digits (the coefficient; trailing zeros count as written)
MAX_SCALE = 40  # exponent >= -40, zero included (0E-99999): a 28-digit VWAP of a >= 1e-13 price
MAX_ADJUSTED = 18  # |x| < 1e19 and exponent <= 18, zero included (0E+99999): the largest
# sizes and daily volumes (memecoins with ~1e15 supply) have 4 orders to spare.
MAX_DECIMAL_CHARS = 64  # the written string: a valid value's canonical form has <= 43
# characters ("-0." and 40 zeros); the rest is room for a venue's leading zeros or "+".
# A book event holds at most ``MAX_BOOK_DEPTH`` levels per side (a snapshot's top levels;
# a delta with more changes than that is published as a snapshot instead).
MAX_BOOK_DEPTH = 100
# Any message ``decode`` reads. The largest valid event is a book event at full depth:
# 200 levels of at most 91 bytes as ``encode`` writes them (decimals in <= 42 characters),
# under 19 KiB; every other event encodes to under 2.5 KiB (tests/core/test_codec.py
# builds both). The rest is room for a writer's longer decimals (leading zeros) and fields
# decode ignores (the candle topic's indicators). 1/32 of Kafka's 1 MiB message.max.bytes.
MAX_MESSAGE_BYTES = 32 * 1024

# Plain ASCII decimal syntax: Decimal() alone also takes "1_000", " 1 ", non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# An unsigned plain decimal of at most 19 characters ("123", "1.5", "1.", ".5") meets
# every limit above by construction (<= 19 digits, <= 18 decimals, < 1e19), so the common
# case skips the checks (see _dec).
_SHORT = MAX_ADJUSTED + 1
_ZERO = Decimal(0)  # (a Decimal compares with a Decimal faster than with an int)
assert _SHORT <= MAX_DIGITS and _SHORT - 1 <= MAX_SCALE


class CodecError(ValueError):
    """A message that cannot be decoded or fails validation; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _str(name: str, v: Any) -> str:
    if type(v) is not str or not v:
        raise CodecError(f"{name}: expected a non-empty string, got {v!r:.60}")
    if len(v) > MAX_CHARS[name]:
        raise CodecError(f"{name}: longer than {MAX_CHARS[name]} characters ({len(v)}): {v!r:.60}")
    if "\x00" in v or not (v.isascii() or _utf8(v)):  # text columns and encode() refuse these
        raise CodecError(f"{name}: NUL or unpaired surrogate in {v!r:.60}")
    return v


def _utf8(v: str) -> bool:
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _dec(name: str, v: Any, positive: bool) -> Decimal:
    if type(v) is not str:
        raise CodecError(f"{name}: expected a decimal string, got {type(v).__name__}")
    # the hot path: a short unsigned plain decimal is within every limit by construction.
    # ASCII digits with at most one point (str methods, a little cheaper than a regex;
    # ASCII first, since isdigit also takes other scripts' digits, which Decimal reads).
    unsigned = len(v) <= _SHORT and v.isascii() and v.replace(".", "", 1).isdigit()
    d = Decimal(v) if unsigned else _bounded(name, v)
    if (not unsigned and d < _ZERO) or (positive and not d):
        raise CodecError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {v}")
    return d


def parse_decimal(name: str, v: Any, positive: bool) -> Decimal:
    """``v`` read by the rules an event's price (``positive``: > 0) or size (>= 0) is:
    a plain ASCII decimal string within the size limits above; CodecError otherwise.
    For exact numbers that are not an event's fields (order-book levels)."""
    return _dec(name, v, positive)


def _bounded(name: str, v: str) -> Decimal:
    """A decimal string checked against the syntax and every size limit."""
    if len(v) > MAX_DECIMAL_CHARS:
        raise CodecError(
            f"{name}: longer than {MAX_DECIMAL_CHARS} characters ({len(v)}): {v!r:.60}"
        )
    if _DECIMAL.fullmatch(v) is None:
        if v.lstrip("+-").lower() in ("nan", "snan", "inf", "infinity"):
            raise CodecError(f"{name}: not finite: {v!r:.60}")
        raise CodecError(f"{name}: not a number: {v!r:.60}")
    try:
        d = Decimal(v)
    except InvalidOperation:  # an exponent beyond the decimal module's range
        raise CodecError(f"{name}: magnitude out of range: {v!r:.60}") from None
    _, digits, exponent = d.as_tuple()
    if len(digits) > MAX_DIGITS:
        raise CodecError(
            f"{name}: more than {MAX_DIGITS} significant digits ({len(digits)}): {v!r:.60}"
        )
    if d and d.adjusted() > MAX_ADJUSTED:
        raise CodecError(f"{name}: magnitude out of range (>= 1e{MAX_ADJUSTED + 1}): {v!r:.60}")
    if not -MAX_SCALE <= exponent <= MAX_ADJUSTED:
        raise CodecError(
            f"{name}: exponent {exponent} out of range [-{MAX_SCALE}, {MAX_ADJUSTED}]: {v!r:.60}"
        )
    return d


def _pos(name: str, v: Any) -> Decimal:
    return _dec(name, v, True)


def _nonneg(name: str, v: Any) -> Decimal:
    return _dec(name, v, False)


def _int(name: str, v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_ID:
        raise CodecError(f"{name}: expected a non-negative integer, got {v!r:.60}")
    return v


def _opt_int(name: str, v: Any) -> int | None:
    return None if v is None else _int(name, v)


# The latest time a message may carry (now + MAX_FUTURE_US) as last read from the clock;
# read again only for a time past it. The bound grows with the clock, so an old reading
# is only ever too strict, and is renewed before a time is refused (a wall clock stepped
# back lets through at most the step more).
_latest_us = 0


def _time(name: str, v: Any) -> int:
    global _latest_us
    if type(v) is not int:
        raise CodecError(f"{name}: expected integer epoch microseconds, got {v!r:.60}")
    if v > _latest_us:
        _latest_us = time.time_ns() // 1000 + MAX_FUTURE_US
    if v < MIN_TIME_US or v > _latest_us:
        raise CodecError(f"{name}: absurd timestamp {v} (epoch microseconds)")
    return v


def _side(name: str, v: Any) -> str:
    if type(v) is not str or v not in TRADE_SIDES:
        raise CodecError(f"{name}: unknown side {v!r:.60}")
    return v


def _tx_side(name: str, v: Any) -> str:
    if type(v) is not str or v not in TX_SIDES:
        raise CodecError(f"{name}: unknown side {v!r:.60}")
    return v


def _status(name: str, v: Any) -> str:
    if type(v) is not str or v not in TX_STATUSES:
        raise CodecError(f"{name}: unknown status {v!r:.60}")
    return v


def _kind(name: str, v: Any) -> str:
    if type(v) is not str or v not in BOOK_KINDS:
        raise CodecError(f"{name}: expected one of {sorted(BOOK_KINDS)}, got {v!r:.60}")
    return v


def _depth(name: str, v: Any) -> int:
    if type(v) is not int or not 1 <= v <= MAX_BOOK_DEPTH:
        raise CodecError(f"{name}: expected an integer in [1, {MAX_BOOK_DEPTH}], got {v!r:.60}")
    return v


def _levels(name: str, v: Any) -> tuple[tuple[Decimal, Decimal], ...]:
    """[[price, qty], ...]: at most MAX_BOOK_DEPTH levels, price > 0, qty >= 0, each price
    once. What a snapshot needs beyond that is checked by ``_book``."""
    if type(v) is not list or len(v) > MAX_BOOK_DEPTH:
        raise CodecError(f"{name}: expected a list of at most {MAX_BOOK_DEPTH} levels")
    out = []
    for level in v:
        if type(level) is not list or len(level) != 2:
            raise CodecError(f"{name}: a level is [price, qty], got {level!r:.60}")
        out.append((_dec(f"{name} price", level[0], True), _dec(f"{name} qty", level[1], False)))
    if len({p for p, _ in out}) != len(out):
        raise CodecError(f"{name}: a price appears twice")
    return tuple(out)


def _book(e: BookUpdate) -> BookUpdate:
    """A book event's rules across fields: no side longer than ``depth``; a snapshot's
    levels present (qty > 0), best first, and not crossed."""
    if len(e.bids) > e.depth or len(e.asks) > e.depth:
        raise CodecError(f"book: more levels than depth {e.depth}")
    if e.kind == "snapshot":
        if any(q == 0 for _, q in (*e.bids, *e.asks)):
            raise CodecError("book: a snapshot level with quantity 0")
        bids, asks = [p for p, _ in e.bids], [p for p, _ in e.asks]
        if bids != sorted(bids, reverse=True) or asks != sorted(asks):
            raise CodecError("book: snapshot levels not best first")
        if bids and asks and bids[0] >= asks[0]:
            raise CodecError(f"book: crossed snapshot (bid {bids[0]} >= ask {asks[0]})")
    return e


Check = Callable[[str, Any], Any]
_SCHEMAS: dict[str, tuple[type, tuple[tuple[str, Check], ...]]] = {
    "trade": (
        Trade,
        (
            ("venue", _str), ("symbol", _str), ("venue_symbol", _str), ("trade_id", _int),
            ("price", _pos), ("qty", _pos), ("side", _side), ("event_us", _time),
            ("recv_us", _time),
        ),
    ),
    "quote": (
        Quote,
        (
            ("venue", _str), ("symbol", _str), ("venue_symbol", _str),
            ("update_id", _opt_int), ("bid_price", _pos), ("bid_qty", _nonneg),
            ("ask_price", _pos), ("ask_qty", _nonneg), ("event_us", _time),
            ("recv_us", _time),
        ),
    ),
    "tx": (
        UserTransaction,
        (
            ("tx_id", _str), ("user_id", _str), ("symbol", _str), ("side", _tx_side),
            ("qty", _pos), ("price", _pos), ("fee", _nonneg), ("status", _status),
            ("event_us", _time),
        ),
    ),
    "candle": (
        Candle,
        (
            ("venue", _str), ("symbol", _str), ("interval", _str), ("open_us", _time),
            ("open", _pos), ("high", _pos), ("low", _pos), ("close", _pos),
            ("volume", _nonneg), ("trade_count", _int), ("vwap", _nonneg), ("source", _str),
        ),
    ),
    "book": (
        BookUpdate,
        (
            ("venue", _str), ("symbol", _str), ("kind", _kind), ("seq", _int),
            ("depth", _depth), ("bids", _levels), ("asks", _levels), ("event_us", _time),
            ("recv_us", _time),
        ),
    ),
}
_TYPE_OF: dict[type, str] = {cls: t for t, (cls, _) in _SCHEMAS.items()}
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f for f, _ in fields) for cls, fields in _SCHEMAS.values()
}


def to_dict(event: Event) -> dict[str, Any]:
    """The wire dict of an event: decimals as strings."""
    out: dict[str, Any] = {"v": VERSION, "t": _TYPE_OF[type(event)]}
    for f in _FIELDS[type(event)]:
        v = getattr(event, f)
        if type(v) is Decimal:
            v = str(v)
        elif type(v) is tuple:  # book levels
            v = [[str(p), str(q)] for p, q in v]
        out[f] = v
    return out


def _int_or_null(v: int | None) -> str:
    return "null" if v is None else str(index(v))


def _levels_json(levels: tuple[tuple[Decimal, Decimal], ...]) -> str:
    text = Decimal.__str__  # refuses anything but a Decimal, like the other writers
    return "[" + ",".join([f'["{text(p)}","{text(q)}"]' for p, q in levels]) + "]"


# encode() writes each type from a template instead of to_dict + json: it is the ingest
# hot path, and this is ~4x faster for the same bytes (tests/core/test_codec.py checks both
# agree); trades and quotes, most of what ingestion publishes, are written out in full
# (``_encode_trade``, ``_encode_quote``). Writers refuse wrong types, so a bad value
# raises and never forges JSON.
_WRITERS: dict[Check, Callable[[Any], Any]] = {
    _str: encode_basestring, _side: encode_basestring, _tx_side: encode_basestring,
    _status: encode_basestring,
    _pos: Decimal.__str__, _nonneg: Decimal.__str__, _int: index, _time: index,
    _opt_int: _int_or_null, _kind: encode_basestring, _depth: index, _levels: _levels_json,
}  # fmt: skip


def _template(t: str, fields: tuple[tuple[str, Check], ...]) -> str:
    """'{"v":1,"t":"trade","venue":%s,...,"price":"%s",...}': decimals go in quotes."""
    slots = [f'"{f}":"%s"' if c in (_pos, _nonneg) else f'"{f}":%s' for f, c in fields]
    return "{" + ",".join([f'"v":{VERSION}', f'"t":"{t}"', *slots]) + "}"


_ENCODERS: dict[type, tuple[str, tuple[Callable[[Any], Any], ...], attrgetter]] = {
    cls: (
        _template(t, fields),
        tuple(_WRITERS[c] for _, c in fields),
        attrgetter(*(f for f, _ in fields)),
    )
    for t, (cls, fields) in _SCHEMAS.items()
}


_text, _dec_text = encode_basestring, Decimal.__str__


def _encode_trade(e: Trade) -> bytes:
    """A trade, written out: the template's bytes with ~40% less work, for the type
    ingestion publishes most (with ``_encode_quote``); same writers, so the same refusals."""
    return (
        f'{{"v":{VERSION},"t":"trade","venue":{_text(e.venue)},"symbol":{_text(e.symbol)},'
        f'"venue_symbol":{_text(e.venue_symbol)},"trade_id":{index(e.trade_id)},'
        f'"price":"{_dec_text(e.price)}","qty":"{_dec_text(e.qty)}","side":{_text(e.side)},'
        f'"event_us":{index(e.event_us)},"recv_us":{index(e.recv_us)}}}'
    ).encode()


def _encode_quote(e: Quote) -> bytes:
    return (
        f'{{"v":{VERSION},"t":"quote","venue":{_text(e.venue)},"symbol":{_text(e.symbol)},'
        f'"venue_symbol":{_text(e.venue_symbol)},"update_id":{_int_or_null(e.update_id)},'
        f'"bid_price":"{_dec_text(e.bid_price)}","bid_qty":"{_dec_text(e.bid_qty)}",'
        f'"ask_price":"{_dec_text(e.ask_price)}","ask_qty":"{_dec_text(e.ask_qty)}",'
        f'"event_us":{index(e.event_us)},"recv_us":{index(e.recv_us)}}}'
    ).encode()


def encode(event: Event) -> bytes:
    kind = type(event)
    if kind is Trade:
        return _encode_trade(event)  # type: ignore[arg-type]
    if kind is Quote:
        return _encode_quote(event)  # type: ignore[arg-type]
    template, writers, values = _ENCODERS[kind]
    return (template % tuple(map(call, writers, values(event)))).encode()


def from_dict(obj: Any) -> Event:
    """Validate a wire dict and build its event; raises CodecError only."""
    if type(obj) is not dict:
        raise CodecError(f"expected a JSON object, got {type(obj).__name__}")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise CodecError(f"unsupported codec version {obj.get('v')!r:.20}")
    t = obj.get("t")
    if t == "trade" and (trade := _ordinary_trade(obj)) is not None:
        return trade
    return _by_schema(obj, t)


def _by_schema(obj: dict[str, Any], t: Any) -> Event:
    """Every check of type ``t``'s schema, field by field, in order."""
    schema = _SCHEMAS.get(t) if type(t) is str else None
    if schema is None:
        raise CodecError(f"unknown event type {t!r:.40}")
    cls, fields = schema
    try:  # every field present: one pass (the ingest hot path for quotes and books)
        event = cls(*[check(name, obj[name]) for name, check in fields])
    except KeyError:  # a field left out: its default, or the first problem in field order
        event = cls(*[check(name, _field(obj, name)) for name, check in fields])
    return _book(event) if cls is BookUpdate else event


def _ordinary_trade(obj: dict[str, Any]) -> Trade | None:
    """The trade of an ordinary wire dict, or None: the ingest hot path (every venue's
    trades, a drain's odd ones). The tests below are stricter than the schema's checks,
    inline instead of nine calls: ASCII names within their limits, short unsigned plain
    decimals (see ``_dec``), times up to the clock's last reading. None sends a dict to
    the full checks for their verdict and reason, so this decides nothing they would not
    (tests/core/test_codec.py holds the two to the same events)."""
    try:
        venue, symbol, venue_symbol = obj["venue"], obj["symbol"], obj["venue_symbol"]
        trade_id, price, qty, side = obj["trade_id"], obj["price"], obj["qty"], obj["side"]
        event_us, recv_us = obj["event_us"], obj["recv_us"]
    except KeyError:
        return None
    if not (
        type(venue) is str and 0 < len(venue) <= _VENUE_CHARS and venue.isascii()
        and type(symbol) is str and 0 < len(symbol) <= _SYMBOL_CHARS and symbol.isascii()
        and type(venue_symbol) is str and 0 < len(venue_symbol) <= _SYMBOL_CHARS
        and venue_symbol.isascii()
        and "\x00" not in venue and "\x00" not in symbol and "\x00" not in venue_symbol
        and type(trade_id) is int and 0 <= trade_id <= MAX_ID
        and type(side) is str and side in TRADE_SIDES
        and type(event_us) is int and MIN_TIME_US <= event_us <= _latest_us
        and type(recv_us) is int and MIN_TIME_US <= recv_us <= _latest_us
        and type(price) is str and len(price) <= _SHORT and price.isascii()
        and price.replace(".", "", 1).isdigit()
        and type(qty) is str and len(qty) <= _SHORT and qty.isascii()
        and qty.replace(".", "", 1).isdigit()
    ):  # fmt: skip
        return None
    p, q = Decimal(price), Decimal(qty)
    if not (p and q):  # unsigned: 0 is the one value a trade's price and qty refuse
        return None
    return Trade(venue, symbol, venue_symbol, trade_id, p, q, side, event_us, recv_us)


_VENUE_CHARS = MAX_CHARS["venue"]
_SYMBOL_CHARS = min(MAX_CHARS["symbol"], MAX_CHARS["venue_symbol"])
_DEFAULTS: dict[str, Any] = {"source": "trades", "update_id": None}


def _field(obj: dict[str, Any], name: str) -> Any:
    try:
        return obj[name]
    except KeyError:
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise CodecError(f"{name}: missing") from None


def decode(data: bytes | str) -> Event:
    if isinstance(data, (bytes, bytearray, str)) and len(data) > MAX_MESSAGE_BYTES:
        # a str is measured in characters: each is at least one byte
        raise CodecError(f"message: {len(data)} bytes, more than {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError
        raise CodecError(f"not JSON: {e}") from None
    except RecursionError:
        raise CodecError("not JSON: nested too deeply") from None
    return from_dict(obj)


def validate(event: Event) -> Event:
    """Check an event built in code (e.g. by an adapter) against the wire rules."""
    return from_dict(to_dict(event))


# The drain's fast path, next to the format it matches: the exact bytes ``encode`` writes
# for an ordinary trade. A value that matches is accepted by ``decode`` with the same
# field values (tests/drain/test_drain_rows.py checks this property), so the price drain
# (``tasks.drain.postgres.PriceBatch``) skips json.loads, Decimal and the dataclass and
# copies the fields straight into its COPY line. Anything else takes the full path.
# The groups are built from the limits above, so that for what ``encode`` writes (printable
# ASCII names, decimals in plain notation) a match and ``decode`` agree exactly; only
# the time range and "price, qty > 0" are left to PriceBatch's own checks.


def _s(limit: int) -> bytes:
    """A JSON string of 1..limit printable ASCII characters, no quote or backslash."""
    return rb'"([\x20\x21\x23-\x5b\x5d-\x7e]{1,%d})"' % limit


def _uint_at_most(n: int) -> bytes:
    """Decimal integers 0..n as ``str`` writes them (no leading zeros)."""
    top = str(n).encode()
    alts = [b"0"]
    if len(top) > 1:  # fewer digits than n
        alts.append(rb"[1-9][0-9]{0,%d}" % (len(top) - 2))
    for i, c in enumerate(top):  # as many digits: n's first i digits, then a smaller one
        low = 0x31 if i == 0 else 0x30
        if c > low:
            rest = b"[0-9]{%d}" % (len(top) - i - 1) if i < len(top) - 1 else b""
            alts.append(top[:i] + b"[%c-%c]" % (low, c - 1) + rest)
    alts.append(top)
    return b"(" + b"|".join(alts) + b")"


# A plain decimal: "0" or "0.<1..MAX_SCALE digits>"; or a nonzero integer part of at most
# MAX_ADJUSTED + 1 digits (|x| < 1e19) and at most MAX_SCALE decimals, MAX_DIGITS digits in
# all (the lookahead: at most MAX_DIGITS + 1 characters with the point). Needs MAX_SCALE <=
# MAX_DIGITS, so the zero branch is within the digit limit too.
_D = rb'"((?:0|(?=[0-9.]{1,%d}")[1-9][0-9]{0,%d})(?:\.[0-9]{1,%d})?)"' % (
    MAX_DIGITS + 1, MAX_ADJUSTED, MAX_SCALE,
)  # fmt: skip
assert MAX_SCALE <= MAX_DIGITS and MAX_SCALE + 2 <= MAX_DECIMAL_CHARS
_T = rb"([1-9][0-9]{15})"  # 16-digit epoch microseconds (2001..2286)
TRADE_PATTERN = re.compile(
    rb'\{"v":1,"t":"trade","venue":' + _s(MAX_CHARS["venue"])
    + rb',"symbol":' + _s(MAX_CHARS["symbol"])
    + rb',"venue_symbol":' + _s(MAX_CHARS["venue_symbol"])
    + rb',"trade_id":' + _uint_at_most(MAX_ID) + rb',"price":' + _D + rb',"qty":' + _D
    + rb',"side":"(buy|sell|unknown)","event_us":' + _T + rb',"recv_us":' + _T + rb"\}"
)  # fmt: skip


# The drain's other shortcut: book deltas are not stored (only snapshots are), so the
# price drain skips them by the opening ``encode`` writes instead of decoding each.
# Safe: the venue and symbol strings hold no escape and the rest of the message no
# backslash and no "v", "t" or "kind" key, so a JSON parser reads v 1, t "book" and kind
# "delta" from such a message: ``decode`` gives a delta or refuses it, never a snapshot
# or another event. Anything else takes the full path.
BOOK_DELTA_PREFIX = re.compile(
    rb'\{"v":1,"t":"book","venue":"[^"\\]+","symbol":"[^"\\]+","kind":"delta",'
)
_RESET_KEYS = (b"\\", b'"kind"', b'"t"', b'"v"')


def is_book_delta(value: bytes) -> bool:
    """True for a book delta as ``encode`` writes it (see above): nothing to store."""
    m = BOOK_DELTA_PREFIX.match(value)
    if m is None:
        return False
    end = m.end()
    return all(value.find(k, end) < 0 for k in _RESET_KEYS)
