"""Checks of flow parameters, run before a flow has any side effect.

Anyone who can start a deployment (the UI, ``prefect deployment run``, an automation)
sets its parameters; a flow must answer a bad value with one line that names the
parameter, what was given and what is accepted, and must not have migrated a schema,
published a record or opened a consumer by then. Each check raises ``ParameterError``
(a ``ValueError``: Prefect ends the run Failed with that line as its message).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

from tasks.core.codec import MAX_CHARS, MIN_TIME_US
from tasks.core.topics import ALERTS, BOOKS, CANDLES, DLQ, QUOTES, TRADES, USER_TRANSACTIONS


class ParameterError(ValueError):
    """A flow parameter is out of its accepted range; the message says which and why."""


# Kafka's own rule for topic names (and the broker's 249-character limit).
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
# What each kind of flow may read: a price drain or a replay must never copy users'
# transactions into price tables or the DLQ, and nothing drains the DLQ or its own output.
NOT_PRICES = frozenset({USER_TRANSACTIONS, DLQ, CANDLES, ALERTS})
NOT_TRANSACTIONS = frozenset({TRADES, QUOTES, BOOKS, DLQ, CANDLES, ALERTS})
# An unquoted, lower-case PostgreSQL identifier that is not a reserved key word.
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# PostgreSQL's reserved key words (``SELECT word FROM pg_get_keywords() WHERE catcode
# = 'R'``, PostgreSQL 15), which cannot name a schema without quotes.
RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric both case cast check collate
    column constraint create current_catalog current_date current_role current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign from grant group having in initially intersect into lateral
    leading limit localtime localtimestamp not null offset on only or order placing
    primary references returning select session_user some symmetric system_user table
    then to trailing true union unique user using variadic when where window with""".split()  # noqa: SIM905
)
IDENT_MONGO = re.compile(r"[A-Za-z0-9_-]{1,63}")  # a MongoDB database name, portable
_CONSUMER = re.compile(r"[A-Za-z0-9._-]{1,200}")
_SYMBOL = re.compile(r"[A-Z0-9]{1,24}-[A-Z0-9]{1,24}")
MAX_SYMBOLS = 500
MAX_PAGES = 100_000  # pages one backfill run may plan (a year of 5-minute pages: 105,120/symbol)
MAX_RANGE_DAYS = 3660


def _fail(name: str, value: object, accepted: str) -> ParameterError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ParameterError(f"parameter {name}={shown}: {accepted}")


def topic(name: str, value: object, refused: frozenset[str] = frozenset()) -> str:
    """A Kafka topic name, not one of ``refused``."""
    if not isinstance(value, str) or not _TOPIC.fullmatch(value):
        raise _fail(name, value, "expected a Kafka topic name ([A-Za-z0-9._-], 1-249 chars)")
    if value in refused:
        raise _fail(
            name, value, f"not a topic this flow may use (refused: {', '.join(sorted(refused))})"
        )
    return value


def schema(value: object) -> str:
    """A PostgreSQL schema name usable unquoted."""
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise _fail("schema", value, "expected a lower-case identifier [a-z_][a-z0-9_]{0,62}")
    if value in RESERVED or value.startswith("pg_"):
        raise _fail("schema", value, "a PostgreSQL reserved word or system prefix")
    return value


def consumer(value: object) -> str:
    """A consumer name (the key of stored offsets)."""
    if not isinstance(value, str) or not _CONSUMER.fullmatch(value):
        raise _fail("consumer", value, "expected [A-Za-z0-9._-], 1-200 characters")
    return value


def venue(value: object, known: Iterable[str]) -> str:
    known = tuple(known)
    if value not in known:
        raise _fail("venue", value, f"expected one of {', '.join(known)}")
    return value  # type: ignore[return-value]


def symbols(value: object) -> list[str]:
    """Canonical symbols (BASE-QUOTE, upper case), at least one, no repeats."""
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise _fail("symbols", value, "expected a non-empty list such as ['BTC-USDT']")
    if len(value) > MAX_SYMBOLS:
        raise _fail("symbols", f"{len(value)} symbols", f"at most {MAX_SYMBOLS} per run")
    for s in value:
        if not isinstance(s, str) or len(s) > MAX_CHARS["symbol"] or not _SYMBOL.fullmatch(s):
            raise _fail("symbols", s, "expected canonical BASE-QUOTE such as BTC-USDT")
    if len(set(value)) != len(value):
        raise _fail("symbols", value, "a symbol is listed twice")
    return list(value)


def _iso(us: int) -> str:
    try:
        return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return str(us)


def time_range(start_us: int, end_us: int, now_us: int) -> tuple[int, int]:
    """``start < end``, not before the codec's earliest time, not in the future, and at
    most ``MAX_RANGE_DAYS`` long."""
    if start_us < MIN_TIME_US:
        raise _fail("start", _iso(start_us), "before 2009-01-03, the earliest time accepted")
    if end_us <= start_us:
        raise _fail("end", _iso(end_us), f"must be after start {_iso(start_us)}")
    if start_us > now_us:
        raise _fail("start", _iso(start_us), "is in the future")
    if end_us - start_us > MAX_RANGE_DAYS * 86_400_000_000:
        raise _fail("end", _iso(end_us), f"the range is over {MAX_RANGE_DAYS} days")
    return start_us, end_us


def number(name: str, value: object, low: float, high: float) -> float:
    """``low <= value <= high`` (bools are refused: ``True`` is not a number of seconds)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(name, value, f"expected a number in [{low:g}, {high:g}]")
    return value


def whole(name: str, value: object, low: int, high: int) -> int:
    """An int in ``[low, high]`` (a count of things: 2.5 processes is refused, not cut)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, f"expected a whole number in [{low}, {high}]")
    return value


def pages(count: int, per_symbol: float) -> int:
    """A backfill's planned page count within ``MAX_PAGES``."""
    if count > MAX_PAGES:
        raise ParameterError(
            f"parameter page_minutes: the range needs {count:,} pages"
            f" ({per_symbol:,.0f} per symbol); at most {MAX_PAGES:,} per run:"
            " use longer pages or a shorter range"
        )
    return count
