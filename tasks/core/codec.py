"""Versioned JSON codec for the events in ``tasks.core.events``.

Wire format (version 1): one JSON object per Kafka message, ``{"v": 1, "t": <type>,
...fields}``; decimals travel as JSON strings so no consumer can read them as floats,
times as integers (epoch microseconds). ``decode`` validates; anything it rejects raises
``CodecError`` whose ``reason`` is what the DLQ record carries. Decoding never raises
anything else.
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
    SIDES,
    TX_SIDES,
    TX_STATUSES,
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
MAX_ID = 2**63 - 1
# Plain ASCII decimal syntax: Decimal() alone also takes "1_000", " 1 ", non-ASCII digits.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# |value| within 1e-40..1e40: anything beyond is garbage that would overflow NUMERIC
# columns or decimal arithmetic downstream and stall a sink.
MAX_ADJUSTED_EXP = 40


class CodecError(ValueError):
    """A message that cannot be decoded or fails validation; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _str(name: str, v: Any) -> str:
    if type(v) is not str or not v:
        raise CodecError(f"{name}: expected a non-empty string, got {v!r:.60}")
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
    if _DECIMAL.fullmatch(v) is None:
        if v.lstrip("+-").lower() in ("nan", "snan", "inf", "infinity"):
            raise CodecError(f"{name}: not finite: {v!r:.60}")
        raise CodecError(f"{name}: not a number: {v!r:.60}")
    try:
        d = Decimal(v)
    except InvalidOperation:  # an exponent beyond the decimal module's range
        raise CodecError(f"{name}: magnitude out of range: {v!r:.60}") from None
    if d and abs(d.adjusted()) > MAX_ADJUSTED_EXP:
        raise CodecError(f"{name}: magnitude out of range: {v!r:.60}")
    if d < 0 or (positive and d == 0):
        raise CodecError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {v}")
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


def _time(name: str, v: Any) -> int:
    if type(v) is not int:
        raise CodecError(f"{name}: expected integer epoch microseconds, got {v!r:.60}")
    if v < MIN_TIME_US or v > time.time_ns() // 1000 + MAX_FUTURE_US:
        raise CodecError(f"{name}: absurd timestamp {v} (epoch microseconds)")
    return v


def _side(name: str, v: Any) -> str:
    if type(v) is not str or v not in SIDES:
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
        out[f] = str(v) if type(v) is Decimal else v
    return out


def _int_or_null(v: int | None) -> str:
    return "null" if v is None else str(index(v))


# encode() writes each type from a template instead of to_dict + json: it is the ingest
# hot path, and this is ~4x faster for the same bytes (tests/core/test_codec.py checks both
# agree). Writers refuse wrong types, so a bad value raises and never forges JSON.
_WRITERS: dict[Check, Callable[[Any], Any]] = {
    _str: encode_basestring, _side: encode_basestring, _tx_side: encode_basestring,
    _status: encode_basestring,
    _pos: Decimal.__str__, _nonneg: Decimal.__str__, _int: index, _time: index,
    _opt_int: _int_or_null,
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


def encode(event: Event) -> bytes:
    template, writers, values = _ENCODERS[type(event)]
    return (template % tuple(map(call, writers, values(event)))).encode()


def from_dict(obj: Any) -> Event:
    """Validate a wire dict and build its event; raises CodecError only."""
    if type(obj) is not dict:
        raise CodecError(f"expected a JSON object, got {type(obj).__name__}")
    if type(obj.get("v")) is not int or obj["v"] != VERSION:
        raise CodecError(f"unsupported codec version {obj.get('v')!r:.20}")
    t = obj.get("t")
    schema = _SCHEMAS.get(t) if type(t) is str else None
    if schema is None:
        raise CodecError(f"unknown event type {obj.get('t')!r:.40}")
    cls, fields = schema
    args = []
    for name, check in fields:
        try:
            v = obj[name]
        except KeyError:
            if name == "source" or name == "update_id":
                v = "trades" if name == "source" else None
            else:
                raise CodecError(f"{name}: missing") from None
        args.append(check(name, v))
    return cls(*args)


def decode(data: bytes | str) -> Event:
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
_S = rb'"([\x20\x21\x23-\x5b\x5d-\x7e]+)"'  # printable ASCII, no quote or backslash
_D = rb'"([0-9]{1,40}(?:\.[0-9]{1,40})?)"'  # plain decimal: |adjusted exponent| <= 40
_T = rb"([1-9][0-9]{15})"  # 16-digit epoch microseconds (2001..2286)
TRADE_PATTERN = re.compile(
    rb'\{"v":1,"t":"trade","venue":' + _S + rb',"symbol":' + _S + rb',"venue_symbol":' + _S
    + rb',"trade_id":(0|[1-9][0-9]{0,17}),"price":' + _D + rb',"qty":' + _D
    + rb',"side":"(buy|sell)","event_us":' + _T + rb',"recv_us":' + _T + rb"\}"
)  # fmt: skip
