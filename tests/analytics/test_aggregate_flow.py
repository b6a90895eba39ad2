"""The aggregate and rebuild flows against real PostgreSQL, Kafka and Prefect: candles
equal the pure computation, late trades recompute exactly their windows, alerts fire
once per crossing."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal as D

import pandas as pd
import pytest

from flows.aggregate import aggregate, rebuild_candles
from tasks.analytics import alerts
from tasks.analytics import candles as cdl
from tasks.analytics import indicators as ind
from tasks.analytics.candle_store import SeriesKey, candles_after
from tasks.core import codec
from tasks.core.pg import connect
from tests.analytics.support import insert_trades, private_schema
from tests.ingest.support import read_topic

M = 60_000_000
HOUR = 60 * M
# windows three hours back are final for every interval (1 h + 120 s grace)
T0 = (time.time_ns() // 1000 // HOUR - 3) * HOUR
SPEC = ind.Spec()


@pytest.fixture(scope="module")
def schema(postgres):
    with private_schema(postgres.pg_dsn) as name:
        yield name


@pytest.fixture
def conn(postgres, schema):
    c = connect(postgres.pg_dsn, schema)
    yield c
    c.close()


def symbol() -> str:
    return f"T{uuid.uuid4().hex[:6].upper()}-USDT"


def minute_trades(sym: str, minute: int, prices: list[str], first_id: int) -> list[tuple]:
    """Trades spread over one minute, ids from ``first_id``."""
    return [
        ("binance", sym, first_id + i, D(p), D("0.5") + i, T0 + minute * M + i * 7_000_000)
        for i, p in enumerate(prices)
    ]


def stored(conn, sym: str, interval: str) -> list:
    return candles_after(conn, SeriesKey("binance", sym, interval), -1)


def messages(kafka, topic: str) -> list[dict]:
    return [json.loads(r.value) for recs in read_topic(kafka, topic).values() for r in recs]


def test_candles_then_a_late_trade(kafka, prefect_server, new_topic, conn, schema):
    sym, topic = symbol(), new_topic(3)
    trades = []
    for m in (0, 1, 2, 4, 5, 6):  # minute 3 is empty
        trades += minute_trades(sym, m, ["100", "101.5", "99.25", str(100 + m)], 1000 + 10 * m)
    insert_trades(conn, trades)
    summary = aggregate(candles_topic=topic, evaluate_alert_rules=False, schema=schema)
    assert summary["candles_changed"] >= 6 + 2 + 1

    frame = cdl.trades_frame(trades)
    for interval in ("1m", "5m", "1h"):
        assert stored(conn, sym, interval) == cdl.to_candles(cdl.compute(frame, interval))
    first = [codec.from_dict(m) for m in messages(kafka, topic)]
    assert first == stored(conn, sym, "1m")  # each 1 m candle published once

    # a late trade in minute 2, and a duplicate of a stored one
    late = ("binance", sym, 5000, D("90"), D("2"), T0 + 2 * M + 59_000_000)
    insert_trades(conn, [late, trades[0]])
    summary = aggregate(candles_topic=topic, evaluate_alert_rules=False, schema=schema)
    mine = [r for r in summary["by_series"] if r["symbol"] == sym]
    assert {(r["interval"], r["windows"], r["changed"]) for r in mine} == {
        ("1m", 1, 1), ("5m", 1, 1), ("1h", 1, 1),
    }  # fmt: skip
    frame = cdl.trades_frame([*trades, late])
    for interval in ("1m", "5m", "1h"):
        assert stored(conn, sym, interval) == cdl.to_candles(cdl.compute(frame, interval))
    msgs = messages(kafka, topic)
    assert len(msgs) == len(first) + 1
    changed = codec.from_dict(msgs[-1])
    assert changed.open_us == T0 + 2 * M
    assert (changed.close, changed.low, changed.trade_count) == (D("90"), D("90"), 5)
    assert "ewma" in msgs[-1]["indicators"]

    # indicators stored after the ripple equal one computation over the whole series
    series = stored(conn, sym, "1m")
    whole = ind.compute(
        pd.DataFrame(
            [(c.open_us, c.high, c.low, c.close, c.volume) for c in series],
            columns=["open_us", "high", "low", "close", "volume"],
        ),
        M,
        SPEC,
        series[0].open_us,
    )
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT open_us, sma, ewma, pct_change, roll_min, roll_max, roll_volume"
            " FROM candle_indicators WHERE symbol = %s AND interval = '1m' ORDER BY open_us",
            (sym,),
        )
        assert cur.fetchall() == list(whole.itertuples(index=False, name=None))

    # nothing new: nothing recomputed, nothing published
    aggregate(candles_topic=topic, evaluate_alert_rules=False, schema=schema)
    assert len(messages(kafka, topic)) == len(msgs)


def test_alert_fires_once_per_crossing(kafka, prefect_server, new_topic, conn, schema):
    sym, candles_topic, alerts_topic = symbol(), new_topic(1), new_topic(1)
    rule = alerts.Rule(f"{sym}-above", "binance", sym, "above", level=D("105"))
    with conn:
        alerts.save_rule(conn, rule)
    # closes per minute: below, above (fires), above, below, above (fires again)
    closes = ["100", "106", "107", "104", "110"]
    fired = []
    for m, close in enumerate(closes):
        insert_trades(conn, minute_trades(sym, 10 + m, ["103", close], 100 * m))
        aggregate(candles_topic=candles_topic, alerts_topic=alerts_topic, schema=schema)
        fired.append(len(messages(kafka, alerts_topic)))
    assert fired == [0, 1, 1, 1, 2]
    docs = messages(kafka, alerts_topic)
    assert [d["alert_id"] for d in docs] == [
        f"{rule.rule_id}:{T0 + 11 * M}", f"{rule.rule_id}:{T0 + 14 * M}",
    ]  # fmt: skip
    assert [d["candle"]["close"] for d in docs] == ["106", "110"]
    assert all(d["symbol"] == sym and d["kind"] == "above" for d in docs)
    # a run with nothing new, and a late trade in an old minute, fire nothing
    insert_trades(conn, [("binance", sym, 9999, D("120"), D("1"), T0 + 12 * M + 1)])
    aggregate(candles_topic=candles_topic, alerts_topic=alerts_topic, schema=schema)
    assert len(messages(kafka, alerts_topic)) == 2


def test_rebuild_restores_lost_candles(kafka, prefect_server, new_topic, conn, schema):
    sym, topic = symbol(), new_topic(1)
    trades = []
    for m in range(0, 12, 2):
        trades += minute_trades(sym, 30 + m, ["50", "51", str(49 + m)], 10 * m)
    insert_trades(conn, trades)
    aggregate(candles_topic=topic, evaluate_alert_rules=False, schema=schema)
    before = {i: stored(conn, sym, i) for i in ("1m", "5m", "1h")}
    with conn, conn.cursor() as cur:  # lose them
        cur.execute("DELETE FROM candles WHERE symbol = %s", (sym,))
        cur.execute("DELETE FROM candle_indicators WHERE symbol = %s", (sym,))
    start, end = T0 + 30 * M, T0 + 42 * M
    result = rebuild_candles(
        "binance", [sym], utc(start), utc(end), candles_topic=topic, schema=schema
    )
    assert result["candles_changed"] == 6 + 3 + 1
    assert {i: stored(conn, sym, i) for i in before} == before
    again = rebuild_candles(
        "binance", [sym], utc(start), utc(end), candles_topic=topic, schema=schema
    )
    assert again["candles_changed"] == 0


def utc(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC)


def test_book_minutes_step(kafka, prefect_server, postgres, new_topic, conn, schema):
    """PREFECT SERVER: the aggregate flow recomputes the book minutes snapshots touched
    (values: tests/analytics/test_book_minutes.py)."""
    from tasks.core.events import BookUpdate
    from tests.drain.support import store_books

    sym = symbol()
    snaps = [
        BookUpdate("binance", sym, "snapshot", i, 2, ((D("99.99"), D(1)),),
                   ((D("100.01"), D(3)),), T0 + i * 20_000_000, T0 + i * 20_000_000 + 1)
        for i in range(6)
    ]  # fmt: skip
    store_books(postgres.pg_dsn, schema, snaps)  # minutes 0 and 1, three snapshots each
    summary = aggregate(
        candles_topic=new_topic(1), evaluate_alert_rules=False, book_bands_bps=[5], schema=schema
    )
    assert summary["book_minutes"]["minutes"] >= 2
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT minute_us, snapshots, mean_mid, imbalance FROM book_minutes"
            " WHERE symbol = %s ORDER BY minute_us",
            (sym,),
        )
        assert cur.fetchall() == [(T0, 3, D(100), D("-0.5")), (T0 + M, 3, D(100), D("-0.5"))]
