"""Alert rules fire once per crossing: pure evaluation of candle sequences."""

from __future__ import annotations

import json
from decimal import Decimal as D

import pytest

from tasks.analytics.alerts import Alert, Rule, State, evaluate, grid_closes
from tasks.core import codec
from tasks.core.events import Candle

W = 60_000_000
T0 = 1_699_999_200_000_000


def candle(minute: int, close: str) -> Candle:
    c = D(close)
    return Candle("binance", "BTC-USDT", "1m", T0 + minute * W, c, c, c, c, D(1), 1, c)


ABOVE = Rule("btc-above-100", "binance", "BTC-USDT", "above", level=D("100"))


def fired_minutes(alerts: list[Alert]) -> list[int]:
    return [(a.candle.open_us - T0) // W for a in alerts]


def test_fires_on_each_crossing_and_not_while_the_condition_holds():
    closes = ["99", "101", "102", "100", "99.5", "100.01", "150"]
    state, alerts = evaluate(
        ABOVE, State(False, T0 - W), [candle(i, c) for i, c in enumerate(closes)]
    )
    assert fired_minutes(alerts) == [1, 5]  # 100 is not above 100; 150 still holds
    assert state == State(True, T0 + 6 * W)


def test_first_candle_only_learns_the_side():
    state, alerts = evaluate(ABOVE, None, [candle(0, "120")])
    assert alerts == [] and state == State(True, T0)
    state, alerts = evaluate(ABOVE, state, [candle(1, "130")])
    assert alerts == []  # still above: no crossing happened
    state, alerts = evaluate(ABOVE, state, [candle(2, "90"), candle(3, "101")])
    assert fired_minutes(alerts) == [3]


def test_below():
    rule = Rule("btc-below-100", "binance", "BTC-USDT", "below", level=D("100"))
    _, alerts = evaluate(rule, State(False, T0 - W), [candle(0, "101"), candle(1, "99.99")])
    assert fired_minutes(alerts) == [1]


def test_state_carried_between_runs_equals_one_run():
    cs = [candle(i, c) for i, c in enumerate(["99", "101", "99", "101", "101", "98", "120"])]
    whole_state, whole = evaluate(ABOVE, State(False, T0 - W), cs)
    state, part1 = evaluate(ABOVE, State(False, T0 - W), cs[:3])
    state, part2 = evaluate(ABOVE, state, cs[3:])
    assert [a.alert_id for a in part1 + part2] == [a.alert_id for a in whole]
    assert state == whole_state


def test_an_evaluated_candle_is_never_evaluated_again():
    with pytest.raises(ValueError, match="already evaluated"):
        evaluate(ABOVE, State(False, T0 + W), [candle(1, "101")])


def test_move_over_a_window_counts_empty_windows():
    rule = Rule("btc-move", "binance", "BTC-USDT", "move", move_pct=D("5"), window=2)
    history = [candle(0, "100")]
    new = [candle(2, "104"), candle(3, "106"), candle(4, "107"), candle(6, "100")]
    # minute 1 and 5 are empty: their close is the previous one carried
    closes = grid_closes(history + new, T0, None)
    assert closes[T0 + W] == D("100") and closes[T0 + 5 * W] == D("107")
    state, alerts = evaluate(rule, State(False, T0), new, closes)
    # 2: 100->104 (4%); 3: 100->106 (6%) fires; 4: 104->107 (2.9%) resets; 6: 107->100 (-6.5%)
    assert fired_minutes(alerts) == [3, 6]
    assert [a.change_pct for a in alerts] == [D("6"), D("-6.542056074766355140186915888")]
    assert state.active


def test_alert_message_carries_the_candle():
    _, (alert,) = evaluate(ABOVE, State(False, T0 - W), [candle(0, "101")])
    doc = json.loads(json.dumps(alert.to_dict()))
    assert doc["alert_id"] == f"btc-above-100:{T0}"
    assert (doc["kind"], doc["level"], doc["price"], doc["symbol"]) == (
        "above", "100", "101", "BTC-USDT",
    )  # fmt: skip
    assert codec.from_dict(doc["candle"]) == alert.candle


def test_rules_are_validated():
    with pytest.raises(ValueError):
        Rule("r", "binance", "BTC-USDT", "above")
    with pytest.raises(ValueError):
        Rule("r", "binance", "BTC-USDT", "move", move_pct=D("0"))
    with pytest.raises(ValueError):
        Rule("r", "binance", "BTC-USDT", "sideways", level=D("1"))
    with pytest.raises(ValueError):
        Rule("r", "binance", "BTC-USDT", "above", level=D("1"), interval="1s")
