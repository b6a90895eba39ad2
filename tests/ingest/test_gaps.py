"""Gap repair without Kafka or Prefect: the tracker, with a publish callback that collects,
against the simulator's venues (Binance and Deribit serve REST trades by id, Coinbase and
Kraken by time only: the same tracker repairs both) and against histories that lack an
id; and the count of holes in Coinbase's sequence_num. The simulator runs as a child
process on a free port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from functools import partial

import pytest
import websocket
from prometheus_client import REGISTRY

from simulator.process import SimulatorProcess
from tasks import venues
from tasks.core.events import Trade
from tasks.ingest.gaps import GapTracker, RepairFailed, SequenceWatch
from tasks.ingest.live import ShardWorker, plan
from tasks.venues.base import IdHistory
from tasks.venues.connection import ConnectionPolicy
from tasks.venues.http import RestError, contiguous_by_time

SYMBOLS = ["BTC-USDT", "ETH-USDT"]
BY_TIME = ["coinbase", "kraken"]
EVERY_VENUE = ["binance", "deribit", *BY_TIME]  # REST by id, then by time: one tracker
T0 = 1_700_000_000_000_000  # µs


class Collect:
    """The publish callback: every (trade, live) in the order the tracker handed it over."""

    def __init__(self) -> None:
        self.trades: list[tuple[Trade, bool]] = []

    def __call__(self, trade: Trade, live: bool) -> None:
        self.trades.append((trade, live))

    def ids(self, symbol: str) -> list[int]:
        return [t.trade_id for t, _ in self.trades if t.symbol == symbol]


def key(t: Trade) -> tuple:
    return (t.trade_id, t.price, t.qty, t.side, t.event_us)


# ---- against the simulator ------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    args = ["--symbols", ",".join(SYMBOLS), "--rate", "200", "--no-bursts"]
    for name in EVERY_VENUE:  # skipped on the stream, kept in REST
        args += ["--fault", f"{name}:gap_every=23,gap_size=3"]
    with SimulatorProcess(*args) as s:
        yield s


def history(sim: SimulatorProcess, name: str) -> IdHistory:
    """What live ingestion repairs from (``gap_history``), unpaced: the pacing is the
    real venue's limit."""
    h = venues.gap_history(name, venues.venue_config(name, sim.http_url))
    assert h is not None
    h.http.min_interval_s = 0  # type: ignore[attr-defined]
    return h


def truth(sim: SimulatorProcess, symbol: str, first: int, last: int) -> list[tuple]:
    """The same market's trades from the simulator's Binance REST, which pages by id."""
    binance = venues.rest_client("binance", venues.venue_config("binance", sim.http_url))
    return [key(t) for t in binance.trades_by_id(symbol, first, last)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", EVERY_VENUE)
def test_holes_in_the_stream_are_repaired_from_rest(sim, name):
    cfg = venues.venue_config(name, sim.http_url)
    adapter = venues.venue(name, cfg)
    published = Collect()
    tracker = GapTracker(cfg.name, history(sim, name), published)
    ws = websocket.create_connection(adapter.connection_url(SYMBOLS, ["trades"]), timeout=10)
    try:
        for frame in adapter.subscribe_frames(SYMBOLS, ["trades"]):
            ws.send(frame)
        deadline = time.monotonic() + 60  # liveness: a busy machine
        while tracker.gaps_repaired < 6 or min(len(published.ids(s)) for s in SYMBOLS) < 200:
            assert time.monotonic() < deadline, f"60 s and only {tracker.gaps_repaired} repairs"
            for event in adapter.parse(ws.recv(), time.time_ns() // 1000).events:
                if type(event) is Trade:
                    tracker.on_trade(event)
    finally:
        ws.close()

    assert tracker.gaps_given_up == 0 and tracker.duplicates == 0
    ledger = sim.report()["venues"][name]["symbols"]
    for s in SYMBOLS:
        ids = published.ids(s)
        assert ids == list(range(ids[0], ids[-1] + 1)), f"{s}: not every id once, in order"
        repaired = {t.trade_id for t, live in published.trades if t.symbol == s and not live}
        skipped = {i for i in ledger[s]["skipped_ids"] if ids[0] < i < ids[-1]}
        assert repaired == skipped and len(repaired) >= 3  # exactly the ids the stream skipped
        # ... and they are the very trades the venue made: same price, size, side, time
        assert [key(t) for t, _ in published.trades if t.symbol == s] == truth(
            sim, s, ids[0], ids[-1]
        )


@pytest.mark.parametrize("name", EVERY_VENUE)
def test_after_a_connect_each_known_symbol_is_topped_up_to_now(sim, name):
    cfg = venues.venue_config(name, sim.http_url)
    rest = history(sim, name)
    symbol = "ETH-USDT"
    deadline = time.monotonic() + 60  # liveness: a few seconds of history to top up from
    while sim.report()["markets"][symbol]["generated"] < 300:
        assert time.monotonic() < deadline, "the simulator made no history"
        time.sleep(0.2)
    now = time.time_ns() // 1000
    start = min(rest.trades_by_time(symbol, now - 2_000_000, now), key=lambda t: t.trade_id)
    newest = sim.report()["markets"][symbol]["last_id"]
    published = Collect()
    tracker = GapTracker(
        cfg.name, rest, published, {symbol: start.trade_id}, {symbol: start.event_us}
    )

    tracker.after_connect(SYMBOLS)  # BTC-USDT has no last trade: the live path starts it

    ids = published.ids(symbol)
    assert ids == list(range(start.trade_id + 1, ids[-1] + 1)) and ids[-1] >= newest
    assert not published.ids("BTC-USDT")
    assert not any(live for _, live in published.trades)
    assert [key(t) for t, _ in published.trades] == truth(sim, symbol, ids[0], ids[-1])
    assert tracker.last[symbol] == ids[-1]
    assert tracker.last_us[symbol] == published.trades[-1][0].event_us
    assert (tracker.gaps_repaired, tracker.trades_repaired) == (1, len(ids))


@pytest.mark.parametrize("name", BY_TIME)
def test_the_registry_repairs_coinbase_and_kraken_gaps(name):
    assert venues.spec(name).sequential_ids
    assert plan(name, ["BTC-USD"], ["trades"]).repairs_gaps
    assert venues.gap_history(name) is not None


# ---- against a history that lacks a trade ---------------------------------------------


def trade(i: int, us: int) -> Trade:
    return Trade("kraken", "BTC-USD", "BTC/USD", i, Decimal("100"), Decimal("1"), "buy", us, us)


class ByTime:
    """A venue whose REST serves trades by time only, over a fixed list of trades; it
    finds ids the way Coinbase's and Kraken's clients do (``contiguous_by_time``)."""

    def __init__(self, trades: list[Trade], now_us: int = T0 + 10**9):
        self.trades = trades
        self.now_us = now_us
        self.asked: list[tuple[int, int]] = []

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> list[Trade]:
        self.asked.append((start_us, end_us))
        return [t for t in self.trades if t.symbol == symbol and start_us <= t.event_us < end_us]

    def trades_by_id(
        self,
        symbol: str,
        from_id: int,
        to_id: int | None,
        start_us: int | None = None,
        end_us: int | None = None,
    ) -> list[Trade]:
        end = self.now_us if end_us is None else end_us
        by_time = partial(self.trades_by_time, symbol)
        return contiguous_by_time("kraken", symbol, from_id, to_id, by_time, start_us, end)


def test_a_repair_takes_in_trades_of_the_same_instant_as_either_bound():
    trades = [trade(i, T0) for i in range(10, 16)]  # six trades in one microsecond
    rest = ByTime(trades)
    published = Collect()
    tracker = GapTracker("kraken", rest, published, {"BTC-USD": 10}, {"BTC-USD": T0})

    tracker.on_trade(trades[-1])  # id 15: 11..14 are missing, all stamped T0 too

    assert [(t.trade_id, live) for t, live in published.trades] == [
        (11, False), (12, False), (13, False), (14, False), (15, True),
    ]  # fmt: skip
    [(start, end)] = rest.asked
    assert start <= T0 < end


def test_a_history_missing_an_id_raises_and_publishes_nothing_of_the_gap():
    trades = [trade(i, T0 + i) for i in range(10, 20) if i != 14]
    published = Collect()
    tracker = GapTracker(
        "kraken", ByTime(trades), published, {"BTC-USD": 10}, {"BTC-USD": T0 + 10},
        max_attempts=2,
    )  # fmt: skip

    with pytest.raises(RepairFailed, match=r"1 of ids 11\.\.18 missing .*first: 14"):
        tracker.on_trade(trade(19, T0 + 19))
    assert published.trades == [] and tracker.last["BTC-USD"] == 10
    with pytest.raises(RestError, match="first: 14"):  # to the newest: a hole all the same
        tracker.fill("BTC-USD", 11, None)
    assert published.trades == []

    tracker.on_trade(trade(19, T0 + 19))  # second attempt: given up, logged, the trade goes on
    assert tracker.gaps_given_up == 1 and [t.trade_id for t, _ in published.trades] == [19]


def test_without_the_last_trades_time_a_by_time_venue_cannot_repair():
    published = Collect()
    tracker = GapTracker("kraken", ByTime([trade(11, T0)]), published, {"BTC-USD": 10})
    with pytest.raises(RepairFailed, match="needs the time of the trade before it"):
        tracker.on_trade(trade(12, T0))
    assert published.trades == []


def test_a_failed_delivery_rewinds_id_and_time_and_is_repaired_by_time():
    trades = [trade(i, T0 + i * 1000) for i in range(10, 20)]
    rest = ByTime(trades)
    published = Collect()
    tracker = GapTracker("kraken", rest, published, {"BTC-USD": 10}, {"BTC-USD": T0 + 10_000})
    for t in trades[1:5]:  # 11..14, live
        tracker.on_trade(t)

    tracker.rewind([trades[3], trades[2]])  # Kafka did not take 13 and 12

    assert (tracker.last["BTC-USD"], tracker.last_us["BTC-USD"]) == (11, trades[2].event_us)
    tracker.on_trade(trades[5])  # 15 finds 12..14 missing: again from REST, in order
    assert [(t.trade_id, live) for t, live in published.trades][4:] == [
        (12, False), (13, False), (14, False), (15, True),
    ]  # fmt: skip


# ---- Coinbase's sequence_num ------------------------------------------------------------


def test_sequence_watch_counts_holes_and_ignores_late_numbers():
    w = SequenceWatch()
    assert [w.see(n) for n in (0, 1, 2, 5, 6, 4, 7, 10)] == [0, 0, 0, 2, 0, 0, 0, 2]
    assert (w.holes, w.missed) == (2, 4)
    w.reset()  # a new connection numbers from 0 again
    assert (w.see(0), w.see(1), w.holes) == (0, 0, 2)


class Lane:
    """The parts of a publisher lane a shard uses while reading frames."""

    has_failures = False
    sent = acked = failed = dead_letters = 0

    def __init__(self) -> None:
        self.events: list = []
        self.letters: list = []

    def publish(self, event, live: bool = True) -> None:
        self.events.append(event)

    def dead_letter(self, source, reason, raw, **context) -> None:
        self.letters.append(raw)


def beat(n: int) -> bytes:
    return (
        '{"channel":"heartbeats","client_id":"","timestamp":"2024-01-02T03:04:05Z",'
        '"sequence_num":%d,"events":[{"heartbeat_counter":%d}]}' % (n, n)
    ).encode()


def test_a_coinbase_shard_counts_messages_its_connection_never_received():
    p = plan("coinbase", ["BTC-USD"], ["trades", "quotes"], simulator_url="http://127.0.0.1:9")
    lane = Lane()
    worker = ShardWorker(p, 0, lane, "run-1", ConnectionPolicy(), {})  # type: ignore[arg-type]
    labels = {"venue": p.config.name, "shard": "0"}
    before = REGISTRY.get_sample_value("tapeline_messages_missed_total", labels) or 0.0
    recv = T0

    for n in (0, 1, 4):  # 2 and 3 never arrived
        worker.on_frame(beat(n), recv)
    worker.on_frame(b'{"channel":"heartbeats","sequence_num":5,', recv)  # not JSON: the DLQ
    worker.on_frame(beat(7), recv)  # the count restarted at the bad frame: no hole reported
    worker.on_connect()  # a new connection (no known trades: nothing to top up)
    worker.on_frame(beat(0), recv)

    counts = worker.counts()
    assert (counts["sequence_gaps"], counts["messages_missed"]) == (1, 2)
    assert REGISTRY.get_sample_value("tapeline_messages_missed_total", labels) == before + 2
    assert len(lane.letters) == 1 and lane.events == []
