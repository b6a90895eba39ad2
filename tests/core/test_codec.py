"""The codec's promises: lossless round trips, CodecError as the only failure, and each
validation rule rejecting what it names; the size limits accept at the limit, reject one
past it, keep wallet arithmetic exact and fit PostgreSQL's columns and indexes."""

from __future__ import annotations

import json
import time
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.core import codec
from tasks.core.codec import (
    TRADE_PATTERN,
    CodecError,
    decode,
    encode,
    from_dict,
    to_dict,
    validate,
)
from tasks.core.events import BookUpdate, Candle, Quote, Trade, UserTransaction
from tasks.core.wallets import effects

NOW_US = time.time_ns() // 1000
T0 = 1_700_000_000_000_000  # 2023-11-14

# -- strategies ----------------------------------------------------------------------------

names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=12,
)
# Decimals anywhere within the codec's limits, keeping their written form (trailing zeros,
# E-notation): 1..MAX_DIGITS digits, exponent from -MAX_SCALE to what keeps |x| < 1e19.


@st.composite
def within_limits(draw) -> Decimal:
    n = draw(st.integers(1, codec.MAX_DIGITS))
    digits = draw(st.integers(10 ** (n - 1), 10**n - 1))
    exponent = draw(st.integers(-codec.MAX_SCALE, codec.MAX_ADJUSTED - n + 1))
    return Decimal(f"{digits}E{exponent}")  # exact (scaleb would round to 28 digits)


positive = within_limits()
zeros = st.integers(-codec.MAX_SCALE, codec.MAX_ADJUSTED).map(lambda e: Decimal(f"0E{e}"))
non_negative = positive | zeros
times = st.integers(codec.MIN_TIME_US, NOW_US)
ids = st.integers(0, codec.MAX_ID)
sides = st.sampled_from(["buy", "sell"])

trades = st.builds(Trade, names, names, names, ids, positive, positive, sides, times, times)
quotes = st.builds(
    Quote, names, names, names, st.none() | ids, positive, non_negative, positive,
    non_negative, times, times,
)  # fmt: skip
txs = st.builds(
    UserTransaction, names, names, names, sides, positive, positive, non_negative,
    st.sampled_from(sorted(codec.TX_STATUSES)), times,
)  # fmt: skip
candles = st.builds(
    Candle, names, names, names, times, positive, positive, positive, positive,
    non_negative, st.integers(0, codec.MAX_ID), non_negative, names,
)  # fmt: skip


@st.composite
def books(draw) -> BookUpdate:
    """Valid book events: a snapshot's sides best first and uncrossed, a delta's prices
    distinct per side (quantity 0 removes)."""
    kind = draw(st.sampled_from(["snapshot", "delta"]))
    depth = draw(st.integers(1, codec.MAX_BOOK_DEPTH))
    size = positive if kind == "snapshot" else non_negative
    prices = draw(st.lists(positive, max_size=2 * depth, unique=True))
    if kind == "snapshot":
        prices.sort()
        cut = draw(st.integers(0, len(prices)))
        bids, asks = prices[:cut][::-1][:depth], prices[cut:][:depth]
    else:
        bids, asks = prices[:depth], prices[depth:]
    return BookUpdate(
        draw(names), draw(names), kind, draw(ids), depth,
        tuple((p, draw(size)) for p in bids), tuple((p, draw(size)) for p in asks),
        draw(times), draw(times),
    )  # fmt: skip


events = trades | quotes | txs | candles | books()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def wire_like(draw):
    """Dicts shaped like wire messages, each field either plausible or arbitrary JSON,
    some missing: they reach every check, not just the version test."""
    t = draw(st.sampled_from(sorted(codec._SCHEMAS)))
    kinds = {"trade": trades, "quote": quotes, "tx": txs, "candle": candles, "book": books()}
    good = to_dict(draw(kinds[t]))
    out = {}
    for k, v in good.items():
        choice = draw(st.integers(0, 9))
        if choice < 6:
            out[k] = v
        elif choice < 9:
            out[k] = draw(json_values)
    return out


# -- properties ----------------------------------------------------------------------------


@given(events)
def test_encode_decode_is_the_identity(event):
    back = decode(encode(event))
    assert back == event
    assert to_dict(back) == to_dict(event)  # same written form, not only equal values


@given(events)
def test_encode_writes_the_same_bytes_as_json_of_to_dict(event):
    expected = json.dumps(to_dict(event), separators=(",", ":"), ensure_ascii=False).encode()
    assert encode(event) == expected


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_raises_only_codec_error(data):
    try:
        decode(data)
    except CodecError as e:
        assert e.reason


@settings(max_examples=300)
@given(json_values)
def test_decoding_arbitrary_json_raises_only_codec_error(value):
    try:
        decode(json.dumps(value))
    except CodecError as e:
        assert e.reason


@settings(max_examples=500)
@given(wire_like())
def test_decoding_wire_like_dicts_raises_only_codec_error(obj):
    try:
        event = decode(json.dumps(obj))
    except CodecError as e:
        assert e.reason
    else:
        assert decode(encode(event)) == event  # anything accepted re-encodes


# -- validation rules ----------------------------------------------------------------------


def trade_wire(**changes):
    wire = {
        "v": 1, "t": "trade", "venue": "binance", "symbol": "BTC-USDT",
        "venue_symbol": "BTCUSDT", "trade_id": 7, "price": "60000.10", "qty": "0.5",
        "side": "buy", "event_us": T0, "recv_us": T0 + 1500,
    }  # fmt: skip
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not ...}


def test_a_trade_without_a_reported_side_is_unknown_never_guessed():
    """Finnhub reports no taker side: "unknown" is a side of its own, on the wire, in the
    drain's fast path and in the trades table's CHECK (migration 0500)."""
    event = from_dict(trade_wire(side="unknown"))
    assert event.side == "unknown" and validate(event) == event
    assert decode(encode(event)) == event
    assert TRADE_PATTERN.fullmatch(encode(event)) is not None


def test_a_valid_trade_decodes_exactly():
    event = from_dict(trade_wire())
    assert event == Trade(
        "binance", "BTC-USDT", "BTCUSDT", 7, Decimal("60000.10"), Decimal("0.5"), "buy",
        T0, T0 + 1500,
    )  # fmt: skip
    assert validate(event) == event


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"price": "0"}, "price: must be > 0"),
        ({"price": "-1"}, "price: must be > 0"),
        ({"qty": "NaN"}, "qty: not finite"),
        ({"qty": "-Infinity"}, "qty: not finite"),
        ({"price": "abc"}, "price: not a number"),
        ({"price": "1_000"}, "price: not a number"),
        ({"price": " 1"}, "price: not a number"),
        ({"price": "١٢"}, "price: not a number"),  # non-ASCII digits
        ({"price": ""}, "price: not a number"),
        ({"price": 1.5}, "price: expected a decimal string, got float"),
        ({"price": "1e41"}, "price: magnitude out of range"),
        ({"qty": "1e-41"}, "qty: exponent -41 out of range"),
        ({"qty": "1e99999999999999999999"}, "qty: magnitude out of range"),
        ({"trade_id": -1}, "trade_id: expected a non-negative integer"),
        ({"trade_id": 2**63}, "trade_id: expected a non-negative integer"),
        ({"trade_id": True}, "trade_id: expected a non-negative integer"),
        ({"trade_id": "7"}, "trade_id: expected a non-negative integer"),
        ({"side": "hold"}, "side: unknown side"),
        ({"side": ["buy"]}, "side: unknown side"),
        ({"side": "deposit"}, "side: unknown side"),  # a user transaction's, not a trade's
        ({"side": None}, "side: unknown side"),
        ({"venue": ""}, "venue: expected a non-empty string"),
        ({"venue": 5}, "venue: expected a non-empty string"),
        ({"symbol": "BTC\x00"}, "symbol: NUL or unpaired surrogate"),
        ({"symbol": "\ud800"}, "symbol: NUL or unpaired surrogate"),
        ({"event_us": codec.MIN_TIME_US - 1}, "event_us: absurd timestamp"),
        ({"event_us": NOW_US + codec.MAX_FUTURE_US + 10**9}, "event_us: absurd timestamp"),
        ({"event_us": 1.7e15}, "event_us: expected integer epoch microseconds"),
        ({"recv_us": ...}, "recv_us: missing"),
        ({"v": 2}, "unsupported codec version"),
        ({"v": True}, "unsupported codec version"),
        ({"v": "1"}, "unsupported codec version"),
        ({"v": ...}, "unsupported codec version"),
        ({"t": "order"}, "unknown event type"),
        ({"t": ["trade"]}, "unknown event type"),
    ],
)
def test_each_rule_rejects_with_its_reason(changes, reason):
    with pytest.raises(CodecError) as exc:
        from_dict(trade_wire(**changes))
    assert exc.value.reason.startswith(reason), exc.value.reason


def test_decimals_keep_their_written_form():
    event = from_dict(trade_wire(price="60000.10000000", qty="1E-7"))
    assert str(event.price) == "60000.10000000"
    assert to_dict(event)["qty"] == "1E-7"


def test_quote_allows_zero_sizes_and_a_missing_update_id():
    wire = {
        "v": 1, "t": "quote", "venue": "kraken", "symbol": "BTC-USD", "venue_symbol": "BTC/USD",
        "bid_price": "1", "bid_qty": "0", "ask_price": "2", "ask_qty": "0.000",
        "event_us": T0, "recv_us": T0,
    }  # fmt: skip
    quote = from_dict(wire)
    assert quote.update_id is None and quote.bid_qty == 0
    with pytest.raises(CodecError, match="ask_price: must be > 0"):
        from_dict({**wire, "ask_price": "0"})


def test_candle_source_defaults_to_trades():
    wire = to_dict(Candle("binance", "BTC-USDT", "1m", T0, *[Decimal(1)] * 5, 0, Decimal(0)))
    del wire["source"]
    assert from_dict(wire).source == "trades"


def test_transaction_status_and_fee_rules():
    tx = UserTransaction(
        "tx-1", "user-1", "BTC-USD", "sell", Decimal("1"), Decimal("2"), Decimal("0"),
        "filled", T0,
    )  # fmt: skip
    assert decode(encode(tx)) == tx
    with pytest.raises(CodecError, match="status: unknown status"):
        from_dict({**to_dict(tx), "status": "pending"})
    with pytest.raises(CodecError, match="fee: must be >= 0"):
        from_dict({**to_dict(tx), "fee": "-0.1"})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b'{"v":1,', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 10_000, "not JSON: nested too deeply"),
        (b"[" * 100_000, "message: 100000 bytes, more than 32768"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
)
def test_decode_rejects_what_is_not_a_message(data, reason):
    with pytest.raises(CodecError) as exc:
        decode(data)
    assert exc.value.reason.startswith(reason)


def test_encode_refuses_wrong_types_instead_of_writing_bad_json():
    bad = Trade("b", "A-B", "AB", '1,"x":2', Decimal(1), Decimal(1), "buy", T0, T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(bad)
    with pytest.raises(TypeError):
        encode(Trade("b", "A-B", "AB", 1, "1", Decimal(1), "buy", T0, T0))  # type: ignore[arg-type]
    one = Decimal(1)
    with pytest.raises(TypeError):
        encode(Quote("b", "A-B", "AB", '1,"x":2', one, one, one, one, T0, T0))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(Quote("b", "A-B", "AB", None, 1.5, one, one, one, T0, T0))  # type: ignore[arg-type]


# -- size limits ---------------------------------------------------------------------------

WIRES = {
    "trade": trade_wire(),
    "quote": to_dict(
        Quote("kraken", "BTC-USD", "XBT/USD", 9, Decimal("60000.1"), Decimal("0.5"),
              Decimal("60000.2"), Decimal("0"), T0, T0 + 1)
    ),
    "tx": to_dict(
        UserTransaction("tx-1", "user-1", "BTC-USDT", "buy", Decimal("0.5"), Decimal("60000.1"),
                        Decimal("0.03"), "filled", T0)
    ),
    "candle": to_dict(
        Candle("binance", "BTC-USDT", "1m", T0, Decimal("1"), Decimal("2"), Decimal("0.5"),
               Decimal("1.5"), Decimal("10"), 3, Decimal("1.25"), "trades")
    ),
    "book": to_dict(
        BookUpdate("kraken", "BTC-USD", "snapshot", 7, 10, ((Decimal("60000.1"), Decimal("0.5")),),
                   ((Decimal("60000.2"), Decimal("0.00100000")),), T0, T0 + 1)
    ),
}  # fmt: skip
FIELDS = [(t, f, check) for t, (_, fields) in codec._SCHEMAS.items() for f, check in fields]
STRING_FIELDS = [(t, f) for t, f, check in FIELDS if check is codec._str]
DECIMAL_FIELDS = [(t, f) for t, f, check in FIELDS if check in (codec._pos, codec._nonneg)]
INT_FIELDS = [(t, f) for t, f, check in FIELDS if check in (codec._int, codec._opt_int)]


def wire(t: str, **changes) -> dict:
    return {**WIRES[t], **changes}


def reason(obj) -> str | None:
    """What from_dict says about ``obj``: None when it accepts it."""
    try:
        from_dict(obj)
    except CodecError as e:
        return e.reason
    return None


def test_every_string_field_has_its_limit():
    assert sorted({f for _, f in STRING_FIELDS}) == sorted(codec.MAX_CHARS)
    assert len(DECIMAL_FIELDS) == 15 and len(INT_FIELDS) == 4


@pytest.mark.parametrize(("t", "field"), STRING_FIELDS)
def test_each_string_is_accepted_at_its_limit_and_rejected_past_it(t, field):
    limit = codec.MAX_CHARS[field]
    at = "".join(chr(0x41 + i % 26) for i in range(limit))
    event = from_dict(wire(t, **{field: at}))
    assert getattr(event, field) == at and decode(encode(event)) == event
    assert reason(wire(t, **{field: at + "Z"})) == (
        f"{field}: longer than {limit} characters ({limit + 1}): {at + 'Z'!r:.60}"
    )
    assert reason(wire(t, **{field: ""})) == f"{field}: expected a non-empty string, got ''"


@pytest.mark.parametrize(
    "char", ["é", "€", "\U0001d539", "\x01"], ids=["2-byte", "3-byte", "4-byte", "escaped"]
)
def test_strings_are_measured_in_characters_whatever_their_bytes(char):
    """Characters, not bytes: 64 of them are at most 256 UTF-8 bytes (or 384 JSON-escaped
    bytes for control characters), which every column, index and message bound holds."""
    limit = codec.MAX_CHARS["symbol"]
    event = from_dict(trade_wire(symbol=char * limit))
    assert len(event.symbol.encode()) == limit * len(char.encode())
    assert decode(encode(event)) == event
    assert reason(trade_wire(symbol=char * (limit + 1))).startswith(
        f"symbol: longer than {limit} characters ({limit + 1})"
    )


def test_what_broke_production_is_rejected_naming_the_field():
    assert reason(trade_wire(symbol="BTC" * 1000)).startswith(
        "symbol: longer than 64 characters (3000)"
    )
    assert reason(trade_wire(price="1." + "1" * 17_000)).startswith(
        "price: longer than 64 characters (17002)"
    )


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("9" * 19, None),  # the largest integer part: |x| < 1e19
        ("1" + "0" * 19, "magnitude out of range (>= 1e19)"),
        ("9.999999999999999999E+18", None),
        ("1E+19", "magnitude out of range (>= 1e19)"),
        ("1E+18", None),
        ("9" * 19 + "." + "9" * 21, None),  # 40 digits
        ("9" * 19 + "." + "9" * 22, "more than 40 significant digits (41)"),
        ("1." + "0" * 39, None),  # trailing zeros are digits as written
        ("1." + "0" * 40, "more than 40 significant digits (41)"),
        ("1" * 40 + "E-40", None),
        ("1" * 41 + "E-41", "more than 40 significant digits (41)"),
        ("0." + "0" * 39 + "1", None),  # 40 decimals
        ("0." + "0" * 40 + "1", "exponent -41 out of range [-40, 18]"),
        ("1E-40", None),
        ("1E-41", "exponent -41 out of range [-40, 18]"),
        ("1E+100000", "magnitude out of range"),
        ("1E-100000", "exponent -100000 out of range [-40, 18]"),
        ("0" * 60 + "1.5", None),  # leading zeros are not significant, only characters
        ("0" * 63 + "1", None),
        ("0" * 64 + "1", "longer than 64 characters (65)"),
        ("0.00000001", None),  # Binance's smallest tick
        ("123456789.12345678", None),  # a Binance size with its 8 decimals
    ],
)
def test_each_decimal_limit_accepts_at_the_limit_and_rejects_past_it(value, rule):
    got = reason(trade_wire(price=value))
    if rule is None:
        assert got is None
        assert from_dict(trade_wire(price=value)).price == Decimal(value)
    else:
        assert got is not None and got.startswith(f"price: {rule}"), got


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("0", None),
        ("0E+18", None),
        ("0E-40", None),
        ("0." + "0" * 40, None),
        ("0E+19", "exponent 19 out of range"),
        ("0E-41", "exponent -41 out of range"),
        ("0." + "0" * 41, "exponent -41 out of range"),
        ("0E+99999", "exponent 99999 out of range"),
        ("0E-99999", "exponent -99999 out of range"),
        ("-0E+99999", "exponent 99999 out of range"),
        ("0E+99999999999999999999", "magnitude out of range"),  # beyond Decimal itself
    ],
)
def test_zero_has_a_bounded_exponent_too(value, rule):
    got = reason(wire("quote", bid_qty=value))  # a field where zero is valid
    if rule is None:
        assert got is None
    else:
        assert got is not None and got.startswith(f"bid_qty: {rule}"), got


@pytest.mark.parametrize(("t", "field"), DECIMAL_FIELDS)
@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("1E+19", "magnitude out of range"),
        ("0E-41", "exponent -41 out of range"),
        ("1." + "0" * 40, "more than 40 significant digits"),
        ("0" * 65, "longer than 64 characters"),
    ],
)
def test_every_decimal_field_is_bounded(t, field, value, rule):
    assert reason(wire(t, **{field: value})).startswith(f"{field}: {rule}")


@pytest.mark.parametrize(("t", "field"), INT_FIELDS)
def test_integers_are_signed_64_bit(t, field):
    assert getattr(from_dict(wire(t, **{field: 2**63 - 1})), field) == codec.MAX_ID
    for bad in (2**63, -1, 10**100):
        assert reason(wire(t, **{field: bad})).startswith(
            f"{field}: expected a non-negative integer"
        )


def test_messages_are_bounded_in_bytes():
    base = json.dumps(trade_wire(), separators=(",", ":"))
    pad = codec.MAX_MESSAGE_BYTES - len(base) - len(',"x":""')
    at = base[:-1] + ',"x":"' + "a" * pad + '"}'  # decode ignores fields it does not know
    assert len(at) == codec.MAX_MESSAGE_BYTES
    assert decode(at.encode()) == decode(at) == from_dict(trade_wire())
    over = at[:-2] + 'a"}'
    for data in (over.encode(), over, bytearray(over.encode())):
        with pytest.raises(CodecError) as exc:
            decode(data)
        limit = codec.MAX_MESSAGE_BYTES
        assert exc.value.reason == f"message: {limit + 1} bytes, more than {limit}"


def _largest(t: str):
    """The event of type ``t`` whose encoding is longest: every string at its limit in
    characters JSON escapes to 6 bytes, every decimal at its longest written form."""
    cls, fields = codec._SCHEMAS[t]
    longest = Decimal("0." + "9" * codec.MAX_SCALE)  # 42 characters as str() writes it
    values = {
        codec._pos: longest, codec._nonneg: longest, codec._int: codec.MAX_ID,
        codec._opt_int: codec.MAX_ID, codec._time: NOW_US, codec._side: "sell",
        codec._tx_side: "deposit", codec._status: "cancelled", codec._kind: "snapshot",
        codec._depth: codec.MAX_BOOK_DEPTH,
    }  # fmt: skip
    if t == "book":  # full depth, distinct 42-character prices, bids below asks
        n = codec.MAX_BOOK_DEPTH
        level = lambda i: (Decimal(f"0.{i:040d}"), longest)  # noqa: E731
        values[codec._levels] = None
        event = cls(*(
            "\x1f" * codec.MAX_CHARS[f] if check is codec._str else values[check]
            for f, check in fields
        ))  # fmt: skip
        bids = tuple(level(i) for i in range(n, 0, -1))
        asks = tuple(level(n + i) for i in range(1, n + 1))
        fields_of = {f: getattr(event, f) for f, _ in fields}
        return BookUpdate(**{**fields_of, "bids": bids, "asks": asks})
    return cls(*(
        "\x1f" * codec.MAX_CHARS[f] if check is codec._str else values[check]
        for f, check in fields
    ))  # fmt: skip


@pytest.mark.parametrize("t", sorted(codec._SCHEMAS))
def test_the_largest_valid_event_encodes_far_under_the_message_limit(t):
    event = validate(_largest(t))
    data = encode(event)
    assert decode(data) == event
    if t == "book":
        assert len(event.bids) == len(event.asks) == codec.MAX_BOOK_DEPTH
        assert len(data) < 19 * 1024 < codec.MAX_MESSAGE_BYTES * 0.6
    else:
        assert len(data) < 2.5 * 1024 < codec.MAX_MESSAGE_BYTES / 12


@settings(max_examples=300)
@given(non_negative)
def test_valid_decimals_are_written_in_at_most_42_characters(d):
    assert from_dict(wire("quote", bid_qty=str(d))).bid_qty == d
    assert len(str(d)) <= 42 < codec.MAX_DECIMAL_CHARS


# Decimal-looking strings around and far past every limit, and strings around theirs.
_lengths = st.sampled_from([0, 1, 18, 19, 20, 21, 39, 40, 41, 42, 63, 64, 65]) | st.integers(0, 70)


@st.composite
def decimal_like(draw) -> str:
    def digits() -> str:
        n = draw(_lengths)
        return draw(st.text("0123456789", min_size=n, max_size=n))

    out = draw(st.sampled_from(["", "", "+", "-"])) + "0" * draw(st.integers(0, 3)) + digits()
    if draw(st.booleans()):
        out += "." + digits()
    if draw(st.booleans()):
        exponent = draw(st.sampled_from([18, 19, 40, 41, 99999, 100000]) | st.integers(-50, 50))
        out += f"E{exponent:+d}"
    return out

@settings(max_examples=500)
@given(decimal_like() | st.text("0123456789.+-eE_ \t\u0661\u00b2", max_size=codec._SHORT + 1))
def test_the_short_decimal_shortcut_reads_what_the_full_check_reads(v):
    """``_dec`` skips the syntax and size checks for short unsigned plain decimals: it must
    accept exactly what ``_bounded`` accepts, as the same value."""

    def read(check):
        try:
            return check()
        except CodecError:
            return "refused"

    full = read(lambda: codec._bounded("qty", v))
    if full != "refused" and full < 0:
        full = "refused"  # a size is >= 0
    assert read(lambda: codec._dec("qty", v, False)) == full


long_text = st.text(max_size=200) | st.integers(0, 200).map(lambda n: "x" * n)


@st.composite
def hostile_wires(draw):
    """Valid wire dicts with one or two fields at or past a limit, or of the wrong type."""
    t = draw(st.sampled_from(sorted(codec._SCHEMAS)))
    fields = codec._SCHEMAS[t][1]
    obj = dict(WIRES[t])
    for f, check in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
        if check in (codec._pos, codec._nonneg):
            value = decimal_like()
        elif check is codec._str:
            limit = codec.MAX_CHARS[f]
            value = long_text | st.text(min_size=limit - 1, max_size=limit + 1)
        elif check is codec._levels:
            level = st.lists(decimal_like(), min_size=2, max_size=2) | st.lists(json_values)
            value = st.lists(level, max_size=codec.MAX_BOOK_DEPTH + 1)
        else:
            value = st.integers() | st.integers(codec.MAX_ID - 1, codec.MAX_ID + 1)
        obj[f] = draw(value | json_values) if draw(st.integers(0, 4)) == 0 else draw(value)
    return obj


@settings(max_examples=500)
@given(hostile_wires())
def test_decode_raises_only_codec_error_and_accepts_only_what_fits(obj):
    try:
        event = decode(json.dumps(obj))
    except CodecError as e:
        assert e.reason
        return
    for f, v in to_dict(event).items():
        if f in codec.MAX_CHARS:
            assert 0 < len(v) <= codec.MAX_CHARS[f]
        elif type(getattr(event, f, None)) is Decimal:
            _, digits, exponent = getattr(event, f).as_tuple()
            assert len(digits) <= codec.MAX_DIGITS
            assert -codec.MAX_SCALE <= exponent <= codec.MAX_ADJUSTED
            assert abs(getattr(event, f)) < Decimal("1E19")
    assert len(encode(event)) <= codec.MAX_MESSAGE_BYTES and decode(encode(event)) == event


@st.composite
def trade_wires(draw):
    """Trade wire dicts, ordinary or with fields at and past every limit the shortcut
    tests (names, decimals, ids, times, side), or left out."""
    now = NOW_US
    times = st.sampled_from(
        [codec.MIN_TIME_US - 1, codec.MIN_TIME_US, now, now + codec.MAX_FUTURE_US + 10**9]
    ) | st.integers(codec.MIN_TIME_US - 10, now + 2 * codec.MAX_FUTURE_US)
    names = long_text | st.sampled_from(["BTC\x00", "\ud800", "é", "BTC-USDT", "x" * 64])
    values = {
        "venue": names, "symbol": names, "venue_symbol": names,
        "trade_id": st.sampled_from([0, codec.MAX_ID, codec.MAX_ID + 1, -1, True]) | st.integers(),
        "price": decimal_like() | st.sampled_from(["0", "0.0", ".5", "5.", "1" * 19, "1" * 20]),
        "qty": decimal_like(), "side": st.sampled_from(["buy", "sell", "unknown", "hold", None]),
        "event_us": times, "recv_us": times,
    }  # fmt: skip
    obj = trade_wire()
    for f in draw(st.lists(st.sampled_from(sorted(values)), max_size=3)):
        obj[f] = draw(values[f] | json_values) if draw(st.integers(0, 5)) == 0 else draw(values[f])
    if draw(st.integers(0, 9)) == 0:
        del obj[draw(st.sampled_from(sorted(values)))]
    return obj


@settings(max_examples=1000)
@given(trade_wires())
def test_the_ordinary_trade_shortcut_builds_only_what_the_full_checks_build(obj):
    """``from_dict`` builds ordinary trades without the schema's per-field checks
    (``_ordinary_trade``, the ingest hot path): what it builds, the full checks build too,
    as the same event; everything else goes to them."""
    codec.from_dict(trade_wire())  # the clock's reading the shortcut compares times with
    fast = codec._ordinary_trade(obj)
    if fast is not None:
        assert codec._by_schema(obj, "trade") == fast
        assert type(fast.price) is Decimal and type(fast.trade_id) is int


def test_an_ordinary_trade_takes_the_shortcut():
    codec.from_dict(trade_wire())
    assert codec._ordinary_trade(trade_wire()) == codec._by_schema(trade_wire(), "trade")


@settings(max_examples=300)
@given(
    st.binary(max_size=3000) | st.text(max_size=3000) | st.none() | st.integers()
    | st.floats() | st.lists(st.integers(), max_size=3)
    | st.integers(0, 3).map(lambda n: b"x" * (codec.MAX_MESSAGE_BYTES + n))
)  # fmt: skip
def test_decode_raises_only_codec_error_on_anything(data):
    try:
        decode(data)
    except CodecError as e:
        assert e.reason


# -- the limits keep wallet arithmetic exact -------------------------------------------------


def _exact_effects(tx: UserTransaction) -> list[tuple[str, Decimal]]:
    """effects() recomputed with unbounded precision (the reference)."""
    with localcontext(Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)):
        if tx.side == "deposit":
            return [(tx.symbol, tx.qty - tx.fee)]
        notional = tx.qty * tx.price
        if tx.side == "buy":
            return [("BTC", tx.qty), ("USDT", -(notional + tx.fee))]
        return [("BTC", -tx.qty), ("USDT", notional - tx.fee)]


def _tx(side: str, qty: Decimal, price: Decimal, fee: Decimal) -> UserTransaction:
    symbol = "USDT" if side == "deposit" else "BTC-USDT"
    return validate(UserTransaction("t", "u", symbol, side, qty, price, fee, "filled", T0))


SMALLEST_40 = Decimal("0." + "9" * 40)  # 40 digits at exponent -40
LARGEST_40 = Decimal("9" * 19 + "." + "9" * 21)  # 40 digits just under 1e19


@pytest.mark.parametrize("side", ["buy", "sell", "deposit"])
@pytest.mark.parametrize(
    ("qty", "price", "fee"),
    [
        (SMALLEST_40, SMALLEST_40, LARGEST_40),  # places 10**-80 .. 10**19: 100 digits
        (Decimal("1E-40"), Decimal("1E-40"), Decimal("9" * 19)),
        (LARGEST_40, LARGEST_40, Decimal("1E-40")),
        (LARGEST_40, SMALLEST_40, SMALLEST_40),
        (Decimal("9" * 19), Decimal("9" * 19), Decimal("0")),
    ],
)
def test_wallet_effects_are_exact_at_the_corners_of_the_limits(side, qty, price, fee):
    tx = _tx(side, qty, price, fee)
    assert effects(tx) == _exact_effects(tx)


@settings(max_examples=500)
@given(st.sampled_from(["buy", "sell", "deposit"]), positive, positive, non_negative)
def test_wallet_effects_of_any_valid_transaction_are_exact(side, qty, price, fee):
    tx = _tx(side, qty, price, fee)
    assert effects(tx) == _exact_effects(tx)


# -- the limits fit PostgreSQL's columns and indexes ---------------------------------------

MIGRATION = Path(__file__).parents[2] / "tasks/drain/migrations/0001_price_history.sql"


def test_postgres_stores_the_largest_values_the_codec_accepts(pg_conn):
    """The price tables (as temporary copies) take every string at its limit in 4-byte
    characters, in their primary keys and indexes, and decimals at both ends of the range."""

    def name(n: int, offset: int) -> str:  # distinct characters: nothing to compress
        return "".join(chr(0x1D400 + offset + i) for i in range(n))

    venue, symbol, venue_symbol = name(32, 0), name(64, 100), name(64, 200)
    interval, source = name(16, 300), name(32, 400)
    big, small = LARGEST_40, Decimal("1" * 40 + "E-40")
    trade = validate(Trade(venue, symbol, venue_symbol, codec.MAX_ID, big, small, "buy",
                           NOW_US, NOW_US))  # fmt: skip
    candle = validate(Candle(venue, symbol, interval, T0, big, big, small, small, big,
                             codec.MAX_ID, small, source))  # fmt: skip
    try:
        with pg_conn.cursor() as cur:
            cur.execute(MIGRATION.read_text().replace("CREATE TABLE ", "CREATE TEMP TABLE "))
            cur.execute(
                "INSERT INTO trades VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [getattr(trade, f) for f in codec._FIELDS[Trade]],
            )
            cur.execute(
                "INSERT INTO quotes VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (venue, symbol, venue_symbol, codec.MAX_ID, big, Decimal("0E-40"), small,
                 Decimal("0E+18"), NOW_US, NOW_US),
            )  # fmt: skip
            cur.execute(
                "INSERT INTO candles VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [getattr(candle, f) for f in codec._FIELDS[Candle]],
            )
            cur.execute("SELECT symbol, price, qty FROM trades")
            assert cur.fetchall() == [(symbol, big, small)]
            cur.execute("SELECT high, low, vwap, trade_count FROM candles")
            assert cur.fetchall() == [(big, small, small, codec.MAX_ID)]
    finally:
        pg_conn.rollback()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"kind": "trade"}, "kind: expected one of"),
        ({"depth": 0}, "depth: expected an integer in [1, 100]"),
        ({"depth": 101}, "depth: expected an integer in [1, 100]"),
        ({"depth": 1, "bids": [["2", "1"], ["1", "1"]]}, "book: more levels than depth 1"),
        ({"bids": [["1", "1"], ["2", "1"]]}, "book: snapshot levels not best first"),
        ({"asks": [["60000.3", "1"], ["60000.2", "1"]]}, "book: snapshot levels not best first"),
        ({"bids": [["60000.2", "1"]]}, "book: crossed snapshot"),
        ({"bids": [["60000.1", "0"]]}, "book: a snapshot level with quantity 0"),
        ({"bids": [["1", "1"], ["1", "2"]], "kind": "delta"}, "bids: a price appears twice"),
        ({"bids": [["1"]]}, "bids: a level is [price, qty]"),
        ({"bids": [["0", "1"]], "kind": "delta"}, "bids price: must be > 0"),
        ({"asks": [["1", "-1"]], "kind": "delta"}, "asks qty: must be >= 0"),
        ({"asks": "60000.2"}, "asks: expected a list of at most 100 levels"),
    ],
)
def test_book_events_are_refused_with_a_reason(changes, expected):
    assert reason(wire("book", **changes)).startswith(expected)


def test_a_book_delta_may_remove_levels_in_any_order():
    delta = from_dict(wire("book", kind="delta", bids=[["60000.3", "0"], ["59999", "2"]]))
    assert delta.bids == ((Decimal("60000.3"), Decimal("0")), (Decimal("59999"), Decimal("2")))
    assert decode(encode(delta)) == delta
