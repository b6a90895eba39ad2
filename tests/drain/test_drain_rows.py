"""The price drain's hot path agrees with the codec, and the wallet rules are exact.

``PriceBatch`` reads ordinary trade messages with one regular expression instead of
``codec.decode``; these properties check that it accepts exactly what the codec accepts
and writes the same values. No services needed.
"""

from __future__ import annotations

from decimal import Decimal
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


def _add(value: bytes) -> tuple[PriceBatch, list]:
    batch = PriceBatch()
    rejects = batch.add("t", 0, [SimpleNamespace(value=value, offset=0)])
    return batch, rejects


def _fields(line: bytes) -> list:
    cells = line.decode().split("\t")
    return [Decimal(c) if i in NUMERIC else c for i, c in enumerate(cells)]


plain_names = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12
)
any_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=12,
)
decimals = st.builds(
    lambda digits, exp: Decimal(digits).scaleb(exp), st.integers(1, 10**18), st.integers(-20, 8)
)
trades = st.builds(
    Trade, any_names | plain_names, plain_names, any_names, st.integers(0, codec.MAX_ID),
    decimals, decimals, st.sampled_from(["buy", "sell"]),
    st.integers(codec.MIN_TIME_US, NOW_US), st.integers(codec.MIN_TIME_US, NOW_US),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(trades)
def test_every_valid_trade_is_written_with_the_codecs_values(t):
    batch, rejects = _add(encode(t))
    assert rejects == [] and batch.quotes == []
    assert _fields(batch.trades[0]) == _fields(trade_line(t))


def test_the_fast_path_takes_ordinary_trades():
    t = Trade("binance", "BTC-USDT", "BTCUSDT", 42, Decimal("64000.10"), Decimal("0.5"), "buy",
              NOW_US, NOW_US + 1)  # fmt: skip
    assert TRADE_PATTERN.fullmatch(encode(t)) is not None
    batch, _ = _add(encode(t))
    assert batch.trades == [
        b"binance\tBTC-USDT\tBTCUSDT\t42\t64000.10\t0.5\tbuy\t%d\t%d" % (NOW_US, NOW_US + 1)
    ]


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
    value = bytes(value)
    batch, rejects = _add(value)
    try:
        event = decode(value)
    except CodecError as e:
        assert [r for _, r in rejects] == [e.reason]
        return
    if type(event) is Trade:
        assert rejects == [] and _fields(batch.trades[0]) == _fields(trade_line(event))
    elif type(event) is Quote:
        assert rejects == [] and batch.quotes == [quote_line(event)]
    else:
        assert len(rejects) == 1 and "unexpected event type" in rejects[0][1]


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
