"""Candles equal hand-computed values on fixed trades, and hold their invariants on any."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.analytics.candles import (
    MINUTE_US,
    candles,
    compute,
    interval_us,
    last_final_open,
    trades_frame,
    window_open,
)
from tasks.core.events import Trade

T0 = 1_699_999_200_000_000  # 2023-11-14 22:00:00 UTC, on an hour boundary
S = 1_000_000


def trade(tid: int, price: str, qty: str, at_s: float, symbol: str = "BTC-USDT") -> Trade:
    event = T0 + int(at_s * S)
    return Trade("binance", symbol, symbol.replace("-", ""), tid, D(price), D(qty), "buy",
                 event, event + 1000)  # fmt: skip


# minute 0: three trades; minute 1: none; minute 2: one trade; then a late one in minute 0
ON_TIME = [
    trade(1, "100.50", "1", 5),
    trade(2, "101.25", "2", 20),
    trade(3, "99.75", "0.5", 40),
    trade(4, "102", "0.25", 130),
]
LATE = trade(5, "98", "1.5", 10)


def by_open(cs):
    return {c.open_us: c for c in cs}


def test_one_minute_candles_by_hand():
    got = by_open(candles(ON_TIME, "1m"))
    assert sorted(got) == [T0, T0 + 2 * MINUTE_US]  # the empty minute has no candle
    m0 = got[T0]
    assert (m0.open, m0.high, m0.low, m0.close) == (
        D("100.50"),
        D("101.25"),
        D("99.75"),
        D("99.75"),
    )
    assert m0.volume == D("3.5") and m0.trade_count == 3
    # (100.50*1 + 101.25*2 + 99.75*0.5) / 3.5 = 352.875 / 3.5, to 28 significant digits
    assert m0.vwap == D("100.8214285714285714285714286")
    assert (m0.interval, m0.source, m0.venue, m0.symbol) == ("1m", "trades", "binance", "BTC-USDT")


def test_single_trade_candle_is_that_trade():
    m2 = by_open(candles(ON_TIME, "1m"))[T0 + 2 * MINUTE_US]
    assert (m2.open, m2.high, m2.low, m2.close, m2.vwap) == (D("102"),) * 5
    assert m2.volume == D("0.25") and m2.trade_count == 1


def test_late_trade_lands_in_its_event_time_window():
    # arrives last, happened at +10 s: between trades 1 and 2 of minute 0
    m0 = by_open(candles([*ON_TIME, LATE], "1m"))[T0]
    assert (m0.open, m0.high, m0.low, m0.close) == (D("100.50"), D("101.25"), D("98"), D("99.75"))
    assert m0.volume == D("5.0") and m0.trade_count == 4
    assert m0.vwap == D("99.975")  # 499.875 / 5.0, exact


def test_five_minute_and_hour_windows():
    for interval in ("5m", "1h"):
        (c,) = candles([*ON_TIME, LATE], interval)
        assert c.open_us == T0 and c.interval == interval
        assert (c.open, c.high, c.low, c.close) == (D("100.50"), D("102"), D("98"), D("102"))
        assert c.volume == D("5.25") and c.trade_count == 5
        assert c.vwap == D("100.0714285714285714285714286")  # 525.375 / 5.25


def test_open_and_close_break_time_ties_by_trade_id():
    same = [trade(11, "2", "1", 30), trade(10, "1", "1", 30), trade(12, "3", "1", 30)]
    (c,) = candles(same, "1m")
    assert (c.open, c.close) == (D("1"), D("3"))


def test_symbols_and_venues_are_separate_series():
    eth = trade(1, "2000", "1", 5, "ETH-USDT")
    cs = candles([*ON_TIME, eth], "1m")
    assert [(c.symbol, c.open_us) for c in cs] == [
        ("BTC-USDT", T0), ("BTC-USDT", T0 + 2 * MINUTE_US), ("ETH-USDT", T0),
    ]  # fmt: skip


def test_sums_are_exact_beyond_28_digits():
    # 28 significant digits would round these products and their sum
    a = trade(1, "12345678901234.123456789", "0.000000012345678901", 1)
    b = trade(2, "0.000000000000000001", "99999999999999.99999", 2)
    (c,) = candles([a, b], "1m")
    assert c.volume == D("99999999999999.999990012345678901")
    assert c.volume != D("0.000000012345678901") + D("99999999999999.99999")  # 28 digits
    assert c.low <= c.vwap <= c.high


def test_empty_input_gives_no_candles():
    assert compute(trades_frame([]), "1m").empty


def test_intervals_and_finality():
    assert interval_us("1m") == 60 * S and interval_us("5m") == 300 * S
    assert interval_us("1h") == 3600 * S and interval_us("1d") == 86400 * S
    for bad in ("", "0m", "1s", "m", "1.5m", "1 m", "1H"):
        with pytest.raises(ValueError):
            interval_us(bad)
    w, grace = 60 * S, 10 * S
    assert window_open(T0 + 59 * S, w) == T0
    # window T0 is final from T0 + 70 s on, not a microsecond earlier
    assert last_final_open(T0 + 70 * S, w, grace) == T0
    assert last_final_open(T0 + 70 * S - 1, w, grace) == T0 - w


prices = st.decimals(min_value=D("0.00000001"), max_value=D("1000000"), places=8)
sizes = st.decimals(min_value=D("0.00000001"), max_value=D("10000"), places=8)
trade_lists = st.lists(
    st.tuples(
        prices,
        sizes,
        st.integers(0, 10 * 60 * S),
        st.sampled_from(["BTC-USDT", "ETH-USDT"]),
    ),
    min_size=1,
    max_size=60,
)


def build(rows) -> list[Trade]:
    return [trade(i, str(p), str(q), t / S, sym) for i, (p, q, t, sym) in enumerate(rows)]


@settings(max_examples=150, deadline=None)
@given(trade_lists, st.sampled_from(["1m", "5m"]))
def test_candle_invariants(rows, interval):
    trades = build(rows)
    cs = candles(trades, interval)
    width = interval_us(interval)
    for c in cs:
        mine = [
            t for t in trades
            if t.symbol == c.symbol and window_open(t.event_us, width) == c.open_us
        ]  # fmt: skip
        assert c.low <= c.open <= c.high and c.low <= c.close <= c.high
        assert c.low <= c.vwap <= c.high
        assert c.volume == sum((t.qty for t in mine), D(0))
        assert c.trade_count == len(mine)
        assert (c.low, c.high) == (min(t.price for t in mine), max(t.price for t in mine))
    assert sum(c.trade_count for c in cs) == len(trades)


@settings(max_examples=100, deadline=None)
@given(trade_lists)
def test_five_minute_candles_agree_with_their_minutes(rows):
    trades = build(rows)
    minutes = candles(trades, "1m")
    for c in candles(trades, "5m"):
        parts = [
            m
            for m in minutes
            if m.symbol == c.symbol and window_open(m.open_us, 300 * S) == c.open_us
        ]
        assert c.open == parts[0].open and c.close == parts[-1].close
        assert c.high == max(m.high for m in parts) and c.low == min(m.low for m in parts)
        assert c.volume == sum((m.volume for m in parts), D(0))
