"""``parsing.loads``: msgspec decodes every venue frame, and a frame it refuses goes to
the standard library. Whatever the frame, the result must be what the standard
library's exact-decimal decoder alone gives (the same values, types and error), so
adapters and their DLQ reasons see no difference between the two."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.venues.base import FeedError
from tasks.venues.parsing import loads

_STDLIB = json.JSONDecoder(parse_float=Decimal, parse_constant=Decimal)

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
)
scalars = st.one_of(
    numbers,
    st.sampled_from(["true", "false", "null", "NaN", "Infinity", "-Infinity"]),
    st.text(max_size=12).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(['"\\ud800"', '"\\udc00x"', '"\\u0000"', '"caf\\u00e9"', '"\u20bf"']),
)


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(_array),
        st.lists(st.tuples(st.sampled_from(["p", "q", "s", "t", "e"]), inner), max_size=4).map(
            _object
        ),  # few key names: duplicate keys come up
    ),
    max_leaves=12,
)


def _stdlib(text: str | bytes) -> object:
    try:
        return _STDLIB.decode(text if type(text) is str else str(text, "utf-8"))
    except (ValueError, TypeError) as e:
        return FeedError(f"v: not JSON: {e}")


def _same(a: object, b: object) -> bool:
    """Equal values of equal types all the way down (Decimal('1.10') is not 1.1, and the
    digits a Decimal keeps count: '1.10' and '1.1' differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, BaseException):
        return str(a) == str(b)
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))  # type: ignore[arg-type]
    if type(a) is Decimal:
        return a.as_tuple() == b.as_tuple() or (a.is_nan() and b.is_nan())  # type: ignore[union-attr]
    return a == b


def _loads(text: str | bytes) -> object:
    try:
        return loads("v", text)
    except FeedError as e:
        return e


@given(documents, st.sampled_from(["", " ", "\n", "x", "}", ",1"]), st.booleans())
def test_every_document_reads_as_the_standard_library_reads_it(
    doc: str, tail: str, as_bytes: bool
) -> None:
    text = doc + tail
    raw = text.encode("utf-8", "surrogatepass") if as_bytes else text
    assert _same(_loads(raw), _stdlib(raw)), text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"p":"50123.45000000","q":0.01230,"t":12345678901234567890123}',  # big int, decimals
        b'{"p":1e400,"q":-0.0,"z":-0}',
        b"\xff\xfe{}",  # not UTF-8
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"",
        b"[" * 5000 + b"]" * 5000,  # deeper than either decoder goes
        '{"s":"\udc80"}',  # a str holding a lone surrogate
    ],
)
def test_edge_frames_read_as_the_standard_library_reads_them(raw: str | bytes) -> None:
    got = _loads(raw)
    if isinstance(got, FeedError) and "nested too deeply" in str(got):
        with pytest.raises(RecursionError):
            _STDLIB.decode(str(raw, "utf-8") if type(raw) is bytes else raw)
        return
    assert _same(got, _stdlib(raw))
