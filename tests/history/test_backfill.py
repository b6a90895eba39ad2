"""Backfill against the simulator's REST history with real Kafka, PostgreSQL, Prefect
and the real drain: a range is filled gap-free and its candle equals the venue's kline;
an identical rerun fetches and changes nothing; a run killed halfway resumes without
fetching a finished page again; venue klines are stored as venue-sourced candles."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from flows import backfill as flows
from simulator.process import ROOT, SimulatorProcess
from tasks.analytics import candles as cdl
from tasks.analytics.candle_store import SeriesKey, candles_after
from tasks.core import codec
from tasks.core.pg import table_checksum
from tasks.venues import venue_config
from tasks.venues.binance import BinanceRest
from tests.history.support import drain_running
from tests.ingest.support import SIM_VENUE, read_topic

SYMBOLS = ["TBFA-USDT", "TBFB-USDT", "TBFC-USDT", "TBFD-USDT"]
S = 1_000_000
MINUTE = 60 * S
CANDLE_FIELDS = ("open_us", "open", "high", "low", "close", "volume", "trade_count")

backfill_candles = flows.backfill_candles.with_options(retries=0)  # fail fast in tests
backfill_trades = flows.backfill_trades.with_options(retries=0)  # fail fast in tests


@pytest.fixture(scope="module")
def sim():
    with SimulatorProcess("--symbols", ",".join(SYMBOLS), "--rate", "400", "--no-bursts") as s:
        s.started_us = time.time_ns() // 1000
        yield s


def utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / S, UTC)


def wait_until(us: int) -> None:
    wait = us / S - time.time()
    if wait > 0:
        time.sleep(wait)


def rest_requests(sim) -> int:
    return sim.report()["rest"]["requests"]


def rest(sim) -> BinanceRest:
    return BinanceRest(venue_config("binance", sim.http_url))


def published_ids(kafka, topic: str) -> dict[str, list[int]]:
    ids = defaultdict(list)
    for records in read_topic(kafka, topic).values():
        for r in records:
            t = codec.decode(r.value)
            ids[t.symbol].append(t.trade_id)
    return ids


def stored_ids(conn, symbol: str) -> list[int]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT trade_id FROM trades WHERE symbol = %s ORDER BY 1", (symbol,))
        return [r[0] for r in cur.fetchall()]


def assert_whole_range(sim, symbol: str, ids: list[int], start_us: int, end_us: int):
    """``ids`` are exactly the trades of [start_us, end_us): contiguous, and the trades
    just outside fall outside (or there is none before: history starts inside)."""
    assert ids == list(range(min(ids), max(ids) + 1)), f"{symbol}: gaps or disorder"
    around = {t.trade_id: t for t in rest(sim).historical_trades(symbol, min(ids) - 1, 2)}
    assert start_us <= around[min(ids)].event_us
    if min(ids) - 1 in around:  # else history starts with this trade
        assert around[min(ids) - 1].event_us < start_us
    last, after = rest(sim).historical_trades(symbol, max(ids), 2)
    assert last.event_us < end_us <= after.event_us


def backfill(sim, schema: str, topic: str, symbols, start, end, **kw):
    return backfill_trades(
        "binance", symbols, start, end, simulator_url=sim.http_url, settle_s=1.0,
        trades_topic=topic, schema=schema, **kw,
    )  # fmt: skip


def test_backfill_killed_halfway_resumes_without_refetching(
    kafka, prefect_server, new_topic, conn, schema, sim
):
    symbols, topic = SYMBOLS[2:], new_topic(3)
    start_s = sim.started_us // S + 1
    start, end = utc(start_s * S), utc((start_s + 6) * S)  # 1 s pages: 12 in all
    wait_until((start_s + 7.5) * S)
    pages = 12
    cmd = [
        sys.executable, "-m", "flows.backfill", "trades", "--venue", "binance",
        "--symbols", ",".join(symbols), "--start", start.isoformat(), "--end", end.isoformat(),
        "--simulator", sim.http_url, "--page-minutes", str(1 / 60), "--settle", "1",
        "--trades-topic", topic, "--no-rebuild", "--min-request-interval", "0.3",
        "--schema", schema,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240  # liveness: a process start on a busy machine
        while done_pages(conn, symbols) < pages // 2:
            assert proc.poll() is None, "the backfill ended before it could be killed"
            assert time.monotonic() < deadline, "waited 240 s for half the pages to be done"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    done = done_pages(conn, symbols)
    assert pages // 2 <= done < pages

    before = rest_requests(sim)
    summary = backfill(sim, schema, topic, symbols, start, end, page_minutes=1 / 60, rebuild=False)
    assert (summary["skipped"], summary["fetched"]) == (done, pages - done)
    # each page is one aggTrades (first id) and one historicalTrades request
    assert rest_requests(sim) - before == 2 * (pages - done)
    ids = published_ids(kafka, topic)
    for symbol in symbols:
        unique = sorted(set(ids[symbol]))
        assert_whole_range(sim, symbol, unique, start_s * S, (start_s + 6) * S)
        # only the page in flight at the kill can have been published twice
        assert len(ids[symbol]) - len(unique) <= 400


def done_pages(conn, symbols: list[str]) -> int:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM backfill_pages WHERE venue = %s AND symbol = ANY(%s)",
            (SIM_VENUE, symbols),
        )
        return cur.fetchone()[0]


def test_backfill_fills_a_minute_gap_free_and_a_rerun_changes_nothing(
    kafka, prefect_server, new_topic, conn, schema, sim
):
    symbols, topic = SYMBOLS[:2], new_topic(3)
    minute = sim.started_us - sim.started_us % MINUTE  # history starts inside this minute
    start, end = utc(minute), utc(minute + MINUTE)
    wait_until(minute + MINUTE + 1.5 * S)  # closed and settled
    run = {"page_minutes": 0.25, "intervals": ["1m"], "grace_s": 0, "wait_for_drain_s": 30}
    with drain_running(kafka, schema, topic):
        summary = backfill(sim, schema, topic, symbols, start, end, **run)
    assert (summary["pages"], summary["fetched"]) == (8, 8)
    assert summary["rebuild"] == 2  # one new 1 m candle per symbol
    sent = published_ids(kafka, topic)
    for symbol in symbols:
        ids = stored_ids(conn, symbol)
        assert sorted(sent[symbol]) == ids  # every trade once, through Kafka and the drain
        assert_whole_range(sim, symbol, ids, minute, minute + MINUTE)
        # the candle from our trades equals the venue's own kline of that minute
        (ours,) = candles_after(conn, SeriesKey(SIM_VENUE, symbol, "1m"), -1)
        (kline,) = rest(sim).klines(symbol, "1m", minute, minute + MINUTE)
        assert [getattr(ours, f) for f in CANDLE_FIELDS] == [
            getattr(kline, f) for f in CANDLE_FIELDS
        ]
        assert ours.source == "trades" and abs(ours.vwap - kline.vwap) <= ours.vwap * D("1e-8")
    tables = [table_checksum(conn, t, "venue, symbol") for t in ("trades", "candles")]

    before = rest_requests(sim)
    with drain_running(kafka, schema, topic):
        again = backfill(sim, schema, topic, symbols, start, end, **run)
    assert (again["fetched"], again["skipped"], again["rows"], again["rebuild"]) == (0, 8, 0, 0)
    assert rest_requests(sim) == before
    assert published_ids(kafka, topic) == sent
    assert [table_checksum(conn, t, "venue, symbol") for t in ("trades", "candles")] == tables

    # venue klines never replace a candle computed from our trades
    klines = backfill_candles(
        "binance", symbols, start, end, simulator_url=sim.http_url, settle_s=0.5, schema=schema
    )
    assert (klines["fetched"], klines["candles_changed"]) == (2, 0)
    assert table_checksum(conn, "candles", "venue, symbol") == tables[1]


def test_backfill_candles_stores_venue_klines(prefect_server, conn, schema, sim):
    symbols = SYMBOLS[2:]  # their trades were published, never drained: no candles of ours
    minute = sim.started_us - sim.started_us % MINUTE
    start, end = utc(minute), utc(minute + MINUTE)
    wait_until(minute + MINUTE + 1.5 * S)
    summary = backfill_candles(
        "binance", symbols, start, end, simulator_url=sim.http_url, settle_s=0.5, schema=schema
    )
    assert (summary["fetched"], summary["candles_changed"]) == (2, 2)
    for symbol in symbols:
        (venue,) = candles_after(conn, SeriesKey(SIM_VENUE, symbol, "1m"), -1)
        trades = list(rest(sim).trades_by_time(symbol, minute, minute + MINUTE))
        (ours,) = cdl.candles(trades, "1m")
        assert venue.source == "venue"
        assert [getattr(venue, f) for f in CANDLE_FIELDS] == [
            getattr(ours, f) for f in CANDLE_FIELDS
        ]
    again = backfill_candles(
        "binance", symbols, start, end, simulator_url=sim.http_url, settle_s=0.5, schema=schema
    )
    assert (again["fetched"], again["skipped"]) == (0, 2)
