"""The price drain's hot path agrees with the codec, and the wallet rules are exact.

``PriceBatch`` reads ordinary trade messages with one regular expression instead of
``codec.decode``; these properties check that it accepts exactly what the codec accepts
and writes the same values. No services needed.
"""

from __future__ import annotations

import re
import time
from decimal import Decimal
from json.encoder import encode_basestring
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.core import codec
from tasks.core.codec import TRADE_PATTERN, CodecError, decode, encode
from tasks.core.events import Quote, Trade, UserTransaction
from tasks.core.wallets import effects
from tasks.drain.postgres import PriceBatch, quote_line, trade_line

NOW_US = 1_790_000_000_000_000
NUMERIC = {3, 4, 5, 7, 8}  # trade_id, price, qty, event_us, recv_us


def _add(*values: bytes) -> tuple[PriceBatch, list]:
    batch = PriceBatch()
    records = [SimpleNamespace(value=v, offset=i) for i, v in enumerate(values)]
    rejects = batch.add("t", 0, records)
    return batch, rejects


def _fields(line: bytes) -> list:
    cells = line.decode().split("\t")
    return [Decimal(c) if i in NUMERIC else c for i, c in enumerate(cells)]


def names(alphabet, limit: int):
    """Short names, and names at the codec's length limit for the field."""
    return st.text(alphabet, min_size=1, max_size=12) | st.text(
        alphabet, min_size=limit - 1, max_size=limit
    )


PLAIN = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
ANY = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


@st.composite
def decimals(draw) -> Decimal:
    """Positive decimals within the codec's limits, most in the plain notation the fast path
    reads (exponent <= 0, |x| >= 1e-6), many at a digit, scale or magnitude limit."""
    n = draw(st.integers(1, codec.MAX_DIGITS))
    digits = draw(st.integers(10 ** (n - 1), 10**n - 1))
    top = codec.MAX_ADJUSTED - n + 1  # the largest exponent that keeps |x| < 1e19
    low = -codec.MAX_SCALE
    exponent = draw(st.integers(max(low, -n - 5), min(0, top)) | st.integers(low, top))
    return Decimal(f"{digits}E{exponent}")  # exact (scaleb would round to 28 digits)


trades = st.builds(
    Trade, names(ANY, codec.MAX_CHARS["venue"]) | names(PLAIN, codec.MAX_CHARS["venue"]),
    names(PLAIN, codec.MAX_CHARS["symbol"]),
    names(ANY, codec.MAX_CHARS["venue_symbol"]) | names(PLAIN, codec.MAX_CHARS["venue_symbol"]),
    st.integers(0, codec.MAX_ID), decimals(), decimals(),
    st.sampled_from(["buy", "sell", "unknown"]),
    st.integers(codec.MIN_TIME_US, NOW_US), st.integers(codec.MIN_TIME_US, NOW_US),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(trades)
def test_every_valid_trade_is_written_with_the_codecs_values(t):
    batch, rejects = _add(encode(t))
    assert rejects == [] and batch.quotes == []
    assert _fields(batch.trades[0]) == _fields(trade_line(t))
    _assert_agree(encode(t))
    _assert_agree(_plain(t))  # the same trade with its decimals in plain notation


def test_the_fast_path_takes_ordinary_trades():
    t = Trade("binance", "BTC-USDT", "BTCUSDT", 42, Decimal("64000.10"), Decimal("0.5"), "buy",
              NOW_US, NOW_US + 1)  # fmt: skip
    assert TRADE_PATTERN.fullmatch(encode(t)) is not None
    batch, _ = _add(encode(t))
    assert batch.trades == [
        b"binance\tBTC-USDT\tBTCUSDT\t42\t64000.10\t0.5\tbuy\t%d\t%d" % (NOW_US, NOW_US + 1)
    ]


def test_freshness_is_the_newest_trade_of_each_symbol_that_is_written():
    def trade(tid: int, symbol: str, event_us: int, venue: str = "binance") -> Trade:
        return Trade(venue, symbol, symbol.replace("-", ""), tid, Decimal("1.5"), Decimal("2"),
                     "buy", event_us, event_us + 1)  # fmt: skip

    odd = trade(4, "ETH-USDT", NOW_US - 5, venue="bin\\ance\t")  # escaped: the slow path
    batch, _ = _add(
        encode(trade(1, "BTC-USDT", NOW_US - 30)), encode(trade(2, "BTC-USDT", NOW_US - 10)),
        encode(trade(3, "BTC-USDT", NOW_US - 20)), encode(odd),
    )  # fmt: skip
    assert batch.newest_us() == {
        ("binance", "BTC-USDT"): NOW_US - 10, ("bin\\ance\t", "ETH-USDT"): NOW_US - 5,
    }  # fmt: skip
    batch.drop([batch.trade_records[1], batch.trade_records[3]])  # refused by the table
    assert batch.newest_us() == {("binance", "BTC-USDT"): NOW_US - 20}


MUTATIONS = st.sampled_from([*b'0123456789.-+eE"\\ :,{}[]abtx\x00\x7f', 0xC3, 0xFF])
EDITS = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 3), st.lists(MUTATIONS, max_size=4)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=1500, deadline=None)
@given(trades, EDITS)
def test_mutated_messages_are_accepted_exactly_when_the_codec_accepts_them(t, edits):
    value = bytearray(encode(t))
    for at, cut, insert in edits:
        at %= len(value) + 1
        value[at : at + cut] = bytes(insert)
    _assert_agree(bytes(value))


def _wire(**changes: str) -> bytes:
    """A trade message as encode writes it, with some fields' JSON text replaced."""
    fields = {
        "venue": '"binance"', "symbol": '"BTC-USDT"', "venue_symbol": '"BTCUSDT"',
        "trade_id": "42", "price": '"64000.10"', "qty": '"0.5"', "side": '"buy"',
        "event_us": str(NOW_US), "recv_us": str(NOW_US + 1),
    }  # fmt: skip
    fields.update(changes)
    body = ",".join(f'"{k}":{v}' for k, v in fields.items())
    return ('{"v":1,"t":"trade",' + body + "}").encode()


def _plain(t: Trade) -> bytes:
    """``t`` as encode writes it, but decimals in plain notation (``format(d, "f")``)."""
    return _wire(
        venue=encode_basestring(t.venue), symbol=encode_basestring(t.symbol),
        venue_symbol=encode_basestring(t.venue_symbol), trade_id=str(t.trade_id),
        price=_q(format(t.price, "f")), qty=_q(format(t.qty, "f")), side=_q(t.side),
        event_us=str(t.event_us), recv_us=str(t.recv_us),
    )  # fmt: skip


def _assert_agree(value: bytes) -> None:
    """The fast path takes ``value`` exactly when decode accepts it and it is written the
    ordinary way: encode's bytes but for decimals in plain notation, with names of printable
    ASCII needing no escape. The batch writes what decode reads either way."""
    m = TRADE_PATTERN.fullmatch(value)
    # what is left to PriceBatch (see TRADE_PATTERN): price and qty > 0, times in range
    max_us = time.time_ns() // 1000 + codec.MAX_FUTURE_US
    fast = (
        m is not None
        and all(m.group(i).strip(b"0.") for i in (5, 6))
        and all(codec.MIN_TIME_US <= int(m.group(i)) <= max_us for i in (8, 9))
    )
    batch, rejects = _add(value)
    try:
        event = decode(value)
    except CodecError as e:
        assert not fast and [r for _, r in rejects] == [e.reason]
        return
    if type(event) is Trade:
        printable = all(0x20 <= c < 0x7F for c in value) and b"\\" not in value
        ordinary = printable and _plain(event) == value
        assert fast == ordinary, (value, fast, ordinary)
        assert rejects == [] and _fields(batch.trades[0]) == _fields(trade_line(event))
    elif type(event) is Quote:
        assert not fast and rejects == [] and batch.quotes == [quote_line(event)]
    else:
        assert not fast and len(rejects) == 1 and "unexpected event type" in rejects[0][1]


def _q(text: str) -> str:
    return f'"{text}"'


DECIMALS_AT_LIMITS = [
    "9" * 19, "1" + "0" * 19,  # |x| < 1e19
    "9" * 19 + "." + "9" * 21, "9" * 19 + "." + "9" * 22,  # 40 digits
    "1." + "0" * 39, "1." + "0" * 40, "1" * 20 + "." + "1" * 20, "1" * 20 + "." + "1" * 21,
    "0." + "0" * 39 + "1", "0." + "0" * 40 + "1",  # 40 decimals
    "0." + "9" * 40, "0." + "9" * 41, "0." + "0" * 40, "0", "0.0",
    "0.00000001", "123456789.12345678", "00.5", "01", "1E-7", "1E+18", "1E+19",
]  # fmt: skip


@pytest.mark.parametrize("field", ["price", "qty"])
@pytest.mark.parametrize("text", DECIMALS_AT_LIMITS)
def test_the_fast_path_agrees_with_decode_at_every_decimal_limit(field, text):
    _assert_agree(_wire(**{field: _q(text)}))


@pytest.mark.parametrize(
    ("field", "text"),
    [
        *[(f, _q("n" * n)) for f in ("symbol", "venue_symbol") for n in (1, 63, 64, 65)],
        *[("venue", _q("v" * n)) for n in (31, 32, 33)],
        ("venue", _q("")), ("symbol", _q("é" * 64)), ("symbol", _q("é" * 65)),
        *[("trade_id", str(n)) for n in (0, 9 * 10**17, 10**18 - 1, 10**18, codec.MAX_ID - 1,
                                         codec.MAX_ID, codec.MAX_ID + 1, 10**19, 10**20)],
        ("trade_id", "01"), ("trade_id", "-1"),
        ("event_us", "9" * 16), ("recv_us", str(codec.MIN_TIME_US - 1)),  # left to PriceBatch
    ],
)  # fmt: skip
def test_the_fast_path_agrees_with_decode_at_every_string_and_id_limit(field, text):
    _assert_agree(_wire(**{field: text}))


@pytest.mark.parametrize("n", [0, 1, 9, 10, 99, 100, 305, 1000, 7_000_001, codec.MAX_ID])
def test_the_id_group_spells_exactly_zero_to_its_bound(n):
    group = re.compile(codec._uint_at_most(n))
    steps = [10**i * d for i in range(len(str(n)) + 1) for d in (1, 3, 7)]
    candidates = {*range(1100), *range(max(0, n - 1000), n + 1000), *(n + s for s in steps),
                  *(n - s for s in steps if s <= n)}  # fmt: skip
    for k in candidates:
        assert (group.fullmatch(str(k).encode()) is not None) == (k <= n), k
    assert group.fullmatch(b"-1") is None and group.fullmatch(b"01") is None


_LENGTHS = st.sampled_from([0, 1, 2, 17, 18, 19, 20, 21, 38, 39, 40, 41, 42]) | st.integers(0, 45)


@st.composite
def plain_decimals(draw) -> str:
    """Decimal text in plain notation, canonical or not, around every length limit."""
    head = draw(st.sampled_from(["0", "1", "9", "00", ""]))
    whole = head + draw(st.text("0123456789", min_size=0, max_size=45))
    whole = whole[: draw(_LENGTHS)] or "0"
    frac = draw(st.text("0123456789", min_size=0, max_size=45))[: draw(_LENGTHS)]
    return whole + ("." + frac if frac or draw(st.booleans()) else "")


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["price", "qty"]), plain_decimals())
def test_the_fast_path_agrees_with_decode_on_plain_decimals(field, text):
    _assert_agree(_wire(**{field: _q(text)}))


def test_copy_text_escapes_what_copy_would_misread():
    t = Trade("a\tb", "X\\Y", "new\nline", 1, Decimal(1), Decimal(1), "buy", NOW_US, NOW_US)
    assert trade_line(t).startswith(b"a\\tb\tX\\\\Y\tnew\\nline\t")


def _tx(side: str, status: str = "filled", symbol: str = "BTC-USDT") -> UserTransaction:
    return UserTransaction("t", "u", symbol, side, Decimal("0.5"), Decimal("60000.01"),
                           Decimal("0.03"), status, NOW_US)  # fmt: skip


@pytest.mark.parametrize(
    ("tx", "expected"),
    [
        (_tx("buy"), [("BTC", Decimal("0.5")), ("USDT", Decimal("-30000.035"))]),
        (_tx("sell"), [("BTC", Decimal("-0.5")), ("USDT", Decimal("29999.975"))]),
        (_tx("buy", "cancelled"), []),
        (_tx("sell", "rejected"), []),
        (_tx("deposit", symbol="USDT"), [("USDT", Decimal("0.47"))]),
    ],
)
def test_wallet_effects_follow_the_rules(tx, expected):
    assert effects(tx) == expected


@pytest.mark.parametrize("bad", [_tx("buy", symbol="BTCUSDT"), _tx("deposit", symbol="BTC-USDT"),
                                 _tx("buy", symbol="B:C-USDT")])  # fmt: skip
def test_transactions_that_cannot_move_a_wallet_are_rejects(bad):
    with pytest.raises(CodecError, match="symbol"):
        effects(bad)
