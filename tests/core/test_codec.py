"""The codec's promises: lossless round trips, CodecError as the only failure, and each
validation rule rejecting what it names."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.core import codec
from tasks.core.codec import CodecError, decode, encode, from_dict, to_dict, validate
from tasks.core.events import Candle, Quote, Trade, UserTransaction

NOW_US = time.time_ns() // 1000
T0 = 1_700_000_000_000_000  # 2023-11-14

# -- strategies ----------------------------------------------------------------------------

names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=12,
)
# Positive decimals across magnitudes, keeping their written form (trailing zeros, E-notation).
positive = st.builds(
    lambda digits, exp: Decimal(digits).scaleb(exp),
    st.integers(1, 10**20),
    st.integers(-30, 10),
)
non_negative = positive | st.sampled_from([Decimal("0"), Decimal("0.00000000")])
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
events = trades | quotes | txs | candles

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
    good = to_dict(draw({"trade": trades, "quote": quotes, "tx": txs, "candle": candles}[t]))
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
        ({"qty": "1e-41"}, "qty: magnitude out of range"),
        ({"qty": "1e99999999999999999999"}, "qty: magnitude out of range"),
        ({"trade_id": -1}, "trade_id: expected a non-negative integer"),
        ({"trade_id": 2**63}, "trade_id: expected a non-negative integer"),
        ({"trade_id": True}, "trade_id: expected a non-negative integer"),
        ({"trade_id": "7"}, "trade_id: expected a non-negative integer"),
        ({"side": "hold"}, "side: unknown side"),
        ({"side": ["buy"]}, "side: unknown side"),
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
        (b"[" * 100_000, "not JSON"),
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
