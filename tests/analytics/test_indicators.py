"""Indicators equal hand-computed values; incremental runs equal one full computation."""

from __future__ import annotations

from decimal import Decimal as D

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.analytics.indicators import COLUMNS, Anchor, Spec, compute

W = 60_000_000
T0 = 1_699_999_200_000_000
# alpha = 2 / (3 + 1) = 0.5 exactly, so the EWMA can be followed by hand
SPEC = Spec(sma=3, ewma_span=3, change=2, rolling=3)


def series(rows) -> pd.DataFrame:
    """rows: (minute, high, low, close, volume)"""
    return pd.DataFrame.from_records(
        [(T0 + m * W, D(h), D(lo), D(c), D(v)) for m, h, lo, c, v in rows],
        columns=["open_us", "high", "low", "close", "volume"],
    )


# minute 2 is empty: close 12 carried, high = low = 12, volume 0
CANDLES = series(
    [
        (0, "11", "9", "10", "1"),
        (1, "13", "10", "12", "2"),
        (3, "17", "12", "16", "3"),
        (4, "15", "7", "8", "4"),
    ]
)


def rows(frame: pd.DataFrame) -> dict[int, dict]:
    return {r["open_us"]: r for r in frame.to_dict("records")}


def test_hand_computed_values_with_an_empty_window():
    got = rows(compute(CANDLES, W, SPEC, emit_from=T0))
    assert sorted(got) == [T0, T0 + W, T0 + 3 * W, T0 + 4 * W]  # no row for the gap
    m0, m1, m3, m4 = (got[T0 + m * W] for m in (0, 1, 3, 4))
    # EWMA seeded with the first close; minute 2 moves it towards the carried 12
    assert [m0["ewma"], m1["ewma"], m3["ewma"], m4["ewma"]] == [
        D("10"), D("11"), D("13.75"), D("10.875"),
    ]  # fmt: skip
    assert m0["sma"] is None and m1["sma"] is None  # warm-up: fewer than 3 windows
    assert m3["sma"] == D("13.33333333333333333333333333")  # (12 + 12 + 16) / 3
    assert m4["sma"] == D("12")  # (12 + 16 + 8) / 3
    assert m1["pct_change"] is None
    assert m3["pct_change"] == D("33.33333333333333333333333333")  # 12 -> 16
    assert m4["pct_change"] == D("-33.33333333333333333333333333")  # carried 12 -> 8
    assert m1["roll_min"] is None and m1["roll_volume"] is None
    assert (m3["roll_min"], m3["roll_max"], m3["roll_volume"]) == (D("10"), D("17"), D("5"))
    assert (m4["roll_min"], m4["roll_max"], m4["roll_volume"]) == (D("7"), D("17"), D("7"))


def test_single_candle_series():
    (only,) = compute(CANDLES.iloc[:1], W, SPEC, emit_from=T0).to_dict("records")
    assert only["ewma"] == D("10") and only["sma"] is None and only["pct_change"] is None


def test_incremental_run_matches_full_run():
    full = rows(compute(CANDLES, W, SPEC, emit_from=T0))
    # second run recomputes from minute 3 with what the store would hand it
    emit = T0 + 3 * W
    lookback = CANDLES[CANDLES.open_us >= emit - SPEC.lookback * W]
    prior = CANDLES[CANDLES.open_us < emit - SPEC.lookback * W]
    anchor = Anchor(T0 + W, D("12"), full[T0 + W]["ewma"])
    part = rows(compute(lookback, W, SPEC, emit, prior_close=prior.close.iloc[-1], anchor=anchor))
    assert sorted(part) == [T0 + 3 * W, T0 + 4 * W]
    for t, r in part.items():
        assert r == full[t]


def test_inputs_that_cannot_be_right_are_refused():
    with pytest.raises(ValueError, match="anchor"):
        compute(CANDLES, W, SPEC, emit_from=T0 + 3 * W)
    off_grid = CANDLES.assign(open_us=CANDLES.open_us + 1)
    off_grid.loc[0, "open_us"] = T0
    with pytest.raises(ValueError, match="grid"):
        compute(off_grid, W, SPEC, emit_from=T0)
    with pytest.raises(ValueError):
        Spec(sma=0)
    assert compute(CANDLES.iloc[:0], W, SPEC, emit_from=T0).columns.tolist() == list(COLUMNS)


def test_ewma_is_never_seeded_from_zero():
    big = series([(0, "50000", "50000", "50000", "1"), (1, "50010", "50010", "50010", "1")])
    first, second = compute(big, W, Spec(ewma_span=20), emit_from=T0)["ewma"]
    assert first == D("50000")
    assert D("50000") < second < D("50010")


decimals = st.decimals(min_value=D("0.0001"), max_value=D("100000"), places=4)
minutes = st.lists(st.integers(0, 400), min_size=1, max_size=40, unique=True).map(sorted)
specs = st.builds(Spec, st.integers(1, 8), st.integers(1, 30), st.integers(1, 8), st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(decimals, minutes, specs)
def test_ewma_of_a_constant_series_is_that_constant(price, ms, spec):
    frame = series([(m, price, price, price, "1") for m in ms])
    out = compute(frame, W, spec, emit_from=T0)
    assert all(e == price for e in out["ewma"])
    assert all(s is None or s == price for s in out["sma"])
    assert all(p is None or p == 0 for p in out["pct_change"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(decimals, decimals), min_size=2, max_size=40), minutes, specs, st.data())
def test_any_split_point_reproduces_the_full_computation(values, ms, spec, data):
    ms = ms[: len(values)]
    frame = series([(m, max(a, b), min(a, b), a, b) for m, (a, b) in zip(ms, values, strict=False)])
    full = rows(compute(frame, W, spec, emit_from=T0))
    k = data.draw(st.integers(0, len(frame) - 1))
    emit = int(frame.open_us.iloc[k])
    start = emit - spec.lookback * W
    before = frame[frame.open_us < start]
    anchor = None
    if k:
        prev = frame.iloc[k - 1]
        anchor = Anchor(int(prev.open_us), prev.close, full[int(prev.open_us)]["ewma"])
    part = compute(
        frame[frame.open_us >= start] if len(before) else frame,
        W,
        spec,
        emit,
        prior_close=before.close.iloc[-1] if len(before) else None,
        anchor=anchor,
    )
    assert len(part) == len(frame) - k
    for t, r in rows(part).items():
        assert r == full[t]
    for r in full.values():
        if r["roll_min"] is not None:
            assert r["roll_min"] <= r["roll_max"]
