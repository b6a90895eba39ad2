"""Reconcile against the simulator's REST history with real Kafka, PostgreSQL, Prefect
and the real drain: a stored day from which 0.1% of the trades were deleted at random
is checked hour by hour, exactly those trades are found and refilled through Kafka, the
exporter's day shows the loss, and a rerun finds nothing; Coinbase and Kraken, whose REST
lists trades by time only, the same over an hour. A stored trade the venue does not list
is reported as extra and left alone. Bad parameters are refused up front."""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from flows import reconcile as flows
from flows.backfill import backfill_trades
from simulator.process import SimulatorProcess
from tasks import venues
from tasks.core import codec
from tasks.core.params import ParameterError
from tasks.history.reconcile import DAY_US
from tasks.telemetry.exporter import newest_days
from tasks.venues import venue_config
from tasks.venues.binance import BinanceRest
from tasks.venues.http import HOUR_US
from tests.history.support import drain_running
from tests.ingest.support import SIM_VENUE, read_topic

SYMBOLS = ["TRCA-USDT", "TRCB-USDT"]
S = 1_000_000

reconcile = flows.reconcile.with_options(retries=0)  # fail fast in tests


@pytest.fixture(scope="module")
def sim():
    """26 hours of past trades (about 14,000 per symbol), then a slow live market."""
    args = ("--symbols", ",".join(SYMBOLS), "--rate", "2", "--no-bursts")
    with SimulatorProcess(*args, "--history-hours", "26", "--history-rate", "0.3") as s:
        yield s


def utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / S, UTC)


def the_day() -> tuple[int, int]:
    """The 24 whole hours that ended last (within the simulator's 26 h of history)."""
    now = time.time_ns() // 1000
    end = now - now % HOUR_US
    return end - DAY_US, end


def venue_ids(sim, symbol: str, start_us: int, end_us: int) -> list[int]:
    rest = BinanceRest(venue_config("binance", sim.http_url))
    return sorted(t.trade_id for t in rest.trades_by_time(symbol, start_us, end_us))


def stored(conn, start_us: int, end_us: int) -> dict[str, list[int]]:
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT symbol, trade_id FROM trades WHERE venue = %s AND event_us >= %s
               AND event_us < %s ORDER BY 1, 2""",
            (SIM_VENUE, start_us, end_us),
        )
        out: dict[str, list[int]] = {s: [] for s in SYMBOLS}
        for symbol, trade_id in cur.fetchall():
            out[symbol].append(trade_id)
        return out


def wait_stored(conn, expected: dict[str, list[int]], start_us: int, end_us: int) -> None:
    deadline = time.monotonic() + 180
    while stored(conn, start_us, end_us) != expected:
        assert time.monotonic() < deadline, "the drain did not store the day within 180 s"
        time.sleep(1)


def run(sim, schema: str, topic: str, start_us: int, end_us: int, **kw):
    return reconcile(
        "binance", SYMBOLS, utc(start_us), utc(end_us), simulator_url=sim.http_url,
        settle_s=0, wait_for_drain_s=120, trades_topic=topic, schema=schema, **kw,
    )  # fmt: skip


def test_a_day_missing_one_in_a_thousand_is_found_exactly_refilled_and_a_rerun_is_clean(
    kafka, prefect_server, new_topic, conn, schema, sim
):
    topic, drain = new_topic(3), f"test-reconcile-{time.time_ns()}"
    start, end = the_day()
    truth = {s: venue_ids(sim, s, start, end) for s in SYMBOLS}
    total = sum(map(len, truth.values()))
    assert total > 20_000, f"the simulator's day holds only {total} trades"

    # the day as the pipeline stored it: published once, drained once
    with drain_running(kafka, schema, topic, drain):
        backfill_trades.with_options(retries=0)(
            "binance", SYMBOLS, utc(start), utc(end), page_minutes=60,
            simulator_url=sim.http_url, settle_s=0, trades_topic=topic, rebuild=False,
            schema=schema,
        )  # fmt: skip
        wait_stored(conn, truth, start, end)

    # lose 0.1% of them at random
    rows = [(s, i) for s, ids in truth.items() for i in ids]
    lost = set(random.Random(14).sample(rows, round(total / 1000)))
    with conn, conn.cursor() as cur:
        cur.execute(
            """DELETE FROM trades WHERE venue = %s
               AND (symbol, trade_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[]))""",
            (SIM_VENUE, [s for s, _ in lost], [i for _, i in lost]),
        )
        assert cur.rowcount == len(lost)
    offsets = {p: len(rs) for p, rs in read_topic(kafka, topic).items()}

    with drain_running(kafka, schema, topic, drain):  # the same drain, continuing
        found = run(sim, schema, topic, start, end)
    assert (found["venue_trades"], found["missing"], found["extra"]) == (total, len(lost), 0)
    assert found["refilled"] == len(lost)
    # exactly the lost trades went back through Kafka, and the table holds the day again
    refilled = [
        codec.decode(r.value) for rs in read_topic(kafka, topic, offsets).values() for r in rs
    ]
    assert {(t.symbol, t.trade_id) for t in refilled} == lost and len(refilled) == len(lost)
    assert stored(conn, start, end) == truth

    # per hour, reconcile_hours holds what was lost in that hour
    lost_at = {(s, i): h for s in SYMBOLS for i, h in _hours(sim, s, start, end).items()}
    per_hour = Counter((s, lost_at[(s, i)]) for s, i in lost)
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT symbol, hour_us, venue_trades, stored_trades, missing, refilled, extra
               FROM reconcile_hours WHERE venue = %s""",
            (SIM_VENUE,),
        )
        hours = {(s, h): rest for s, h, *rest in cur.fetchall()}
    assert len(hours) == 24 * len(SYMBOLS)
    for key, (listed, held, missing, refills, extra) in hours.items():
        assert (missing, refills, extra) == (per_hour[key], per_hour[key], 0), key
        assert held == listed - missing

    # the exporter's newest day: the UTC day of the last hour checked, as found
    (day,) = [d for d in newest_days(conn) if d.venue == SIM_VENUE]
    in_day = [(k, v) for k, v in hours.items() if day.day_us <= k[1] < day.day_us + DAY_US]
    assert day.missing == sum(v[2] for _, v in in_day)
    assert day.ratio == pytest.approx(1 - day.missing / sum(v[0] for _, v in in_day))

    again = run(sim, schema, topic, start, end)
    assert (again["venue_trades"], again["missing"], again["extra"], again["refilled"]) == (
        total, 0, 0, 0,
    )  # fmt: skip
    assert sum(map(len, read_topic(kafka, topic).values())) == sum(offsets.values()) + len(lost)


def _hours(sim, symbol: str, start_us: int, end_us: int) -> dict[int, int]:
    """Trade id -> its UTC hour, from the venue."""
    rest = BinanceRest(venue_config("binance", sim.http_url))
    return {
        t.trade_id: t.event_us - t.event_us % HOUR_US
        for t in rest.trades_by_time(symbol, start_us, end_us)
    }


def test_a_stored_trade_the_venue_does_not_list_is_reported_and_kept(
    kafka, prefect_server, new_topic, conn, schema, sim
):
    topic = new_topic(1)
    _, end = the_day()
    hour = end - HOUR_US
    symbol = SYMBOLS[0]
    with conn, conn.cursor() as cur:  # a row no venue trade explains
        cur.execute(
            """INSERT INTO trades (venue, symbol, venue_symbol, trade_id, price, qty, side,
                                   event_us, recv_us)
               VALUES (%s, %s, 'TRCAUSDT', 999999999, 1, 1, 'buy', %s, %s)
               ON CONFLICT DO NOTHING""",
            (SIM_VENUE, symbol, hour + 1, hour + 1),
        )
    try:
        result = reconcile(
            "binance", [symbol], utc(hour), utc(end), refill=False,
            simulator_url=sim.http_url, settle_s=0, trades_topic=topic, schema=schema,
        )  # fmt: skip
        assert result["extra"] == 1
        assert read_topic(kafka, topic) == {0: []}  # report only: nothing published
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT extra FROM reconcile_hours WHERE venue = %s AND symbol = %s"
                " AND hour_us = %s",
                (SIM_VENUE, symbol, hour),
            )
            assert cur.fetchone() == (1,)
            cur.execute("SELECT count(*) FROM trades WHERE trade_id = 999999999")
            assert cur.fetchone() == (1,)  # reported, not deleted
    finally:
        with conn, conn.cursor() as cur:
            cur.execute("DELETE FROM trades WHERE trade_id = 999999999")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"venue": "finnhub"}, "serves no trade history"),
        ({"venue": "nyse"}, "parameter venue='nyse'"),
        ({"symbols": ["btcusdt"]}, "parameter symbols="),
        ({"start": None}, "give both, or neither"),
        ({"end": datetime.now(UTC) + timedelta(hours=1)}, "must be at least settle_s"),
        ({"start": datetime(2026, 1, 1, tzinfo=UTC)}, "at most 31 days"),
        ({"trades_topic": "user.transactions"}, "parameter trades_topic="),
        ({"schema": "select"}, "parameter schema="),
    ],
)
def test_bad_parameters_are_refused_in_one_line_before_the_run(change, message):
    """Through Prefect's own parameter validation, as a worker-started run is checked."""
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    args = {"venue": "binance", "symbols": ["BTC-USDT"], "start": end - timedelta(hours=1)}
    args |= {"end": end, "settle_s": 0} | change
    with pytest.raises(ParameterError, match=message) as refused:
        flows.reconcile.validate_parameters(args)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("venue", ["coinbase", "kraken"])
def test_venues_served_by_time_are_reconciled_the_same_way(
    kafka, prefect_server, new_topic, conn, schema, sim, venue
):
    """Coinbase and Kraken list trades by time only: an hour stored, three trades lost,
    exactly those refilled, and a rerun finds nothing."""
    topic, drain, symbol = new_topic(1), f"test-reconcile-{venue}-{time.time_ns()}", SYMBOLS[1]
    _, end = the_day()
    start = end - HOUR_US
    stored_as = f"{venue}-sim"
    with drain_running(kafka, schema, topic, drain):
        backfill_trades.with_options(retries=0)(
            venue, [symbol], utc(start), utc(end), page_minutes=60,
            simulator_url=sim.http_url, settle_s=0, trades_topic=topic, rebuild=False,
            schema=schema,
        )  # fmt: skip
        client = venues.trades_client(venue, venue_config(venue, sim.http_url))
        ids = sorted(t.trade_id for t in client.trades_by_time(symbol, start, end))
        deadline = time.monotonic() + 180
        while _ids(conn, stored_as, symbol, start, end) != ids:
            assert time.monotonic() < deadline, "the drain did not store the hour in 180 s"
            time.sleep(1)
    lost = random.Random(venue).sample(ids, 3)
    with conn, conn.cursor() as cur:
        cur.execute(
            "DELETE FROM trades WHERE venue = %s AND symbol = %s AND trade_id = ANY(%s)",
            (stored_as, symbol, lost),
        )
    args = {"simulator_url": sim.http_url, "settle_s": 0, "trades_topic": topic, "schema": schema}
    with drain_running(kafka, schema, topic, drain):
        found = reconcile(venue, [symbol], utc(start), utc(end), wait_for_drain_s=120, **args)
    assert (found["venue_trades"], found["missing"], found["refilled"], found["extra"]) == (
        len(ids), 3, 3, 0,
    )  # fmt: skip
    assert _ids(conn, stored_as, symbol, start, end) == ids
    again = reconcile(venue, [symbol], utc(start), utc(end), **args)
    assert (again["missing"], again["extra"]) == (0, 0)


def _ids(conn, venue: str, symbol: str, start_us: int, end_us: int) -> list[int]:
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT trade_id FROM trades WHERE venue = %s AND symbol = %s
               AND event_us >= %s AND event_us < %s ORDER BY 1""",
            (venue, symbol, start_us, end_us),
        )
        return [r[0] for r in cur.fetchall()]
