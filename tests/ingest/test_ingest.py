"""Ingestion against the local simulator and the real local Kafka: every trade id once,
in id order per symbol, whatever the venue does; bad frames in the DLQ; a SIGKILLed
run resumes from Kafka and repairs the downtime; validate mode reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable

import pytest
from prefect.exceptions import TerminationSignal

import flows.ingest as ingest_flow
from flows.common import sigterm_noticed, stop_if_terminated
from flows.ingest import ingest
from simulator.process import ROOT, SimulatorProcess
from tasks.core import codec
from tasks.core.events import Quote
from tasks.core.topics import DLQ
from tasks.venues import simulated
from tests.ingest.support import (
    SIM_VENUE,
    assert_contiguous,
    dead_letters,
    end_offsets,
    first_sent,
    last_json_line,
    last_sent,
    malformed_delivered,
    read_topic,
    trade_ids,
)
from tests.ports import free_port

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT"]


def _sim(*faults: str, rate: int = 400, symbols: list[str] = SYMBOLS) -> SimulatorProcess:
    args = ["--symbols", ",".join(symbols), "--rate", str(rate), "--shutdown-grace", "0.3"]
    for f in faults:
        args += ["--fault", f]
    return SimulatorProcess(*args)


def _script(
    sim: SimulatorProcess,
    steps: list[tuple[float, str, dict]],
    out: dict,
    started: Callable[[], bool],
) -> threading.Thread:
    """Run ``(at_s, action, params)`` steps against the simulator while the flow runs,
    timed from when ``started()`` first holds (the flow is connected and publishing: a
    fault injected before then finds no connection to hit). A connection fault that
    found none (the client still reconnecting from the step before, slow on a loaded
    machine) is tried again until it hits one."""

    def run() -> None:
        deadline = time.monotonic() + 120  # liveness: a flow run's start on a busy machine
        while not started() and time.monotonic() < deadline:
            time.sleep(0.1)
        t0 = time.monotonic()
        for at, action, params in steps:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            if action == "faults":
                sim.set_faults("binance", **params)
            elif action == "report":
                out["report"] = sim.report()
            else:
                hit = sim.inject(action, "binance", **params)
                until = time.monotonic() + 60  # liveness: a reconnect on a busy machine
                while hit.get("connections") == 0 and time.monotonic() < until:
                    time.sleep(0.2)
                    hit = sim.inject(action, "binance", **params)
                out.setdefault("injected", []).append(hit)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_faults_leave_every_trade_once_in_id_order(kafka, prefect_server, new_topic):
    trades, quotes = new_topic(3), new_topic(3)
    dlq_start = end_offsets(kafka, DLQ)
    standing = "binance:gap_every=97,gap_size=3,dup_every=89,malformed_every=41"
    with _sim(standing) as sim:
        seen: dict = {}
        # Malformed frames only while no connection fault can discard frames still queued
        # for the client (those never arrive, so they cannot be in the DLQ).
        steps = [
            (4.0, "faults", {"malformed_every": 0}),
            (5.0, "drop", {}),
            (7.0, "shutdown", {}),
            (9.0, "stall", {"seconds": 3}),
            (12.5, "faults", {"malformed_every": 41}),
            (14.5, "faults", {"malformed_every": 0}),
            (15.5, "report", {}),
        ]
        script = _script(sim, steps, seen, lambda: sum(end_offsets(kafka, trades).values()) > 0)
        report = ingest(
            venue="binance",
            symbols=SYMBOLS,
            simulator_url=sim.http_url,
            validate_mode="off",
            metrics_port=0,
            stall_timeout_s=1.5,
            run_seconds=25,  # the steps end 15.5 s after the first trade is published
            trades_topic=trades,
            quotes_topic=quotes,
            progress_every_s=5,
        )
        script.join(5)
        final = sim.report()

    assert report["sent"] == report["acked"] > 1000 and report["failed"] == 0
    assert report["unresolved_at_exit"] == 0
    reasons = report["reconnects"]
    assert reasons.get("connection_lost", 0) + reasons.get("closed_by_venue", 0) >= 1, reasons
    assert reasons.get("server_shutdown") == 1 and reasons.get("stall") == 1, reasons
    assert report["gaps_repaired"] >= 5 and report["trades_repaired"] >= 15
    assert report["duplicates_dropped"] >= 3 and report["gaps_given_up"] == 0

    ids = trade_ids(kafka, trades)
    assert sorted(ids) == sorted(SYMBOLS)
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)
        assert ids[symbol][0] == first_sent(final, symbol)
        assert ids[symbol][-1] >= last_sent(seen["report"], symbol)
        skipped = final["venues"]["binance"]["symbols"][symbol]["skipped_ids"]
        assert any(ids[symbol][0] < s < ids[symbol][-1] for s in skipped)
    assert report["last_trade_ids"] == {s: i[-1] for s, i in ids.items()}

    expected = malformed_delivered(final)
    letters = dead_letters(kafka, dlq_start, report["run_id"])
    assert len(expected) >= 10
    assert Counter(d["raw"].decode() for d in letters) == Counter(expected)
    assert report["bad_frames"] == report["dead_letters"] == len(expected)
    assert all(d["source"] == f"ingest.{SIM_VENUE}" and d["reason"] for d in letters)
    assert {d["context"]["venue"] for d in letters} == {SIM_VENUE}

    quotes_seen = [
        codec.decode(r.value) for recs in read_topic(kafka, quotes).values() for r in recs
    ]
    assert quotes_seen and all(type(q) is Quote for q in quotes_seen)
    assert {q.symbol for q in quotes_seen} == set(SYMBOLS)


def test_sigkill_then_restart_repairs_the_downtime(kafka, prefect_server, new_topic):
    symbols = SYMBOLS[:3]
    trades, quotes = new_topic(3), new_topic(3)
    with _sim(rate=300, symbols=symbols) as sim:
        cmd = [
            sys.executable, "-m", "flows.ingest", "--simulator", sim.http_url,
            "--symbols", ",".join(symbols), "--channels", "trades,quotes",
            "--trades-topic", trades, "--quotes-topic", quotes, "--validate", "off",
            "--metrics-port", "0", "--progress-every", "2",
        ]  # fmt: skip
        first = subprocess.Popen(
            [*cmd, "--seconds", "60"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 180  # liveness: a process start on a busy machine
            while sum(end_offsets(kafka, trades).values()) < 300:
                assert first.poll() is None, "first run ended early"
                assert time.monotonic() < deadline, "waited 180 s for the first run to publish"
                time.sleep(0.3)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        killed = {s: m["last_id"] for s, m in sim.report()["markets"].items()}
        time.sleep(3)
        down_until = {s: m["last_id"] for s, m in sim.report()["markets"].items()}
        # The killed run could not release its lease: the restart waits until it expires
        # (45 s after the last renewal), then repairs all of the downtime.
        second = subprocess.run(
            [*cmd, "--seconds", "5"], cwd=ROOT, capture_output=True, text=True, timeout=360
        )
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"waiting for lease {SIM_VENUE}:" in second.stderr, second.stderr[-3000:]
        final = sim.report()

    report = last_json_line(second.stdout)
    assert report["trades_repaired"] > 0 and report["gaps_repaired"] >= len(symbols)
    ids = trade_ids(kafka, trades)
    for s in symbols:
        assert down_until[s] - killed[s] >= 100  # trades really happened while it was down
        assert_contiguous(ids[s], s)
        assert ids[s][0] == first_sent(final, s)
        assert ids[s][-1] > down_until[s]


def test_validate_only_reports(kafka, prefect_server, new_topic):
    trades = new_topic(1)
    with _sim(rate=100) as sim:
        good = ingest(
            symbols=SYMBOLS, shard_size=2, simulator_url=sim.http_url, validate_mode="only",
            trades_topic=trades, metrics_port=0, first_message_timeout_s=10,
        )  # fmt: skip
        missing = ingest(
            symbols=SYMBOLS[:1], channels=["trades"], simulator_url=sim.http_url,
            validate_mode="only", trades_topic=f"{trades}.missing", metrics_port=0,
        )  # fmt: skip
    bad_symbol = ingest(symbols=["BTCUSDT"], validate_mode="only", metrics_port=0)

    assert good["ok"], good
    names = [c["check"] for c in good["checks"]]
    assert names == [
        "configuration", "kafka", "topics", "shard 0 first message", "shard 1 first message"
    ]  # fmt: skip
    assert not missing["ok"]
    verdict = {c["check"]: c["ok"] for c in missing["checks"]}
    assert verdict == {
        "configuration": True, "kafka": True, "topics": False, "shard 0 first message": True
    }  # fmt: skip
    assert not bad_symbol["ok"] and "BTCUSDT" in bad_symbol["checks"][0]["detail"]


def test_a_feed_silent_at_start_is_asked_again(kafka, prefect_server, new_topic, monkeypatch):
    """on_start: nothing answers the first validation (the feed comes up only after it has
    failed); the run asks again instead of failing, and streams."""
    trades = new_topic(1)
    port = free_port()  # nothing listens on it until the simulator takes it
    sims: list[SimulatorProcess] = []
    passed: list[bool] = []
    real = ingest_flow._validate

    def feed_up_after_the_first(*args, **kwargs):
        report = real(*args, **kwargs)
        passed.append(report["ok"])
        if len(passed) == 1:  # started (and ready) only now
            sims.append(SimulatorProcess("--symbols", SYMBOLS[0], "--port", str(port)))
        return report

    monkeypatch.setattr(ingest_flow, "_validate", feed_up_after_the_first)
    try:
        report = ingest(
            symbols=SYMBOLS[:1], channels=["trades"], simulator_url=f"http://127.0.0.1:{port}",
            # liveness: a ready simulator's first frame takes 0.01-0.08 s; a busy machine
            # may miss even 5 s once, and then the third attempt is the one that passes
            validate_mode="on_start", first_message_timeout_s=5, run_seconds=3,
            trades_topic=trades, metrics_port=0,
        )  # fmt: skip
    finally:
        for sim in sims:
            sim.stop()
    assert passed[0] is False and passed[-1] is True, passed
    assert report["sent"] == report["acked"] > 0 and report["failed"] == 0


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX signals")
def test_sigterm_flushes_and_exits(kafka, prefect_server, new_topic):
    """SIGTERM mid-stream: the run stops reading, flushes, and what it counted as
    acknowledged is exactly what the topic holds."""
    trades, quotes = new_topic(3), new_topic(1)
    with _sim(rate=300, symbols=SYMBOLS[:2]) as sim:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.ingest",
                "--simulator",
                sim.http_url,
                "--symbols",
                ",".join(SYMBOLS[:2]),
                "--trades-topic",
                trades,
                "--quotes-topic",
                quotes,
                "--validate",
                "off",
                "--metrics-port",
                "0",
                "--progress-every",
                "1",
                "--channels",
                "trades",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180  # liveness: a process start on a busy machine
        while sum(end_offsets(kafka, trades).values()) < 200:
            assert proc.poll() is None, "the ingestion ended before it published 200 trades"
            assert time.monotonic() < deadline, "waited 180 s for the ingestion to publish"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        try:  # liveness: the flush may take its 30 s on a busy broker, then Prefect's exit
            _, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the ingestion still ran 90 s after SIGTERM: {err[-3000:]}")
    assert "stopped: " in err, err[-3000:]
    stopped = last_json_line(err.split("stopped: ", 1)[1].splitlines()[0])
    assert stopped["unresolved_at_exit"] == 0
    ids = trade_ids(kafka, trades)
    assert sum(map(len, ids.values())) == stopped["acked"]
    for s, got in ids.items():
        assert_contiguous(got, s)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX signals")
def test_a_sigterm_python_swallowed_still_stops_the_stream():
    """Seen in CI: SIGTERM landed while the main thread ran a weakref callback, Python
    swallowed the handler's TerminationSignal ("Exception ignored in ... weakref.py"), and
    the ingestion streamed on. The noticed Event makes the loop raise it after all, and
    the handler in place stays Prefect's (its cancel handshake checks that it is)."""

    class Thing:
        pass

    def prefects_handler(signum, frame):
        raise TerminationSignal(signum)

    original = signal.signal(signal.SIGTERM, prefects_handler)
    swallowed: list[BaseException] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: swallowed.append(u.exc_value)
    try:
        terminated = sigterm_noticed()
        assert signal.getsignal(signal.SIGTERM) is prefects_handler
        stop_if_terminated(terminated)  # nothing yet
        thing = Thing()
        ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))
        del thing  # the callback runs, the signal lands in it, the raise is swallowed
        assert ref() is None
        deadline = time.monotonic() + 10  # liveness: a signal's delivery to this process
        while not terminated.is_set():
            assert time.monotonic() < deadline, "the swallowed SIGTERM was not noticed"
            time.sleep(0.01)
        assert [type(e) for e in swallowed] == [TerminationSignal], swallowed  # still reported
        with pytest.raises(TerminationSignal):
            stop_if_terminated(terminated)
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, original)


@pytest.mark.parametrize("venue", ["coinbase", "kraken"])
def test_other_venues_flow_through_the_same_machinery(kafka, prefect_server, new_topic, venue):
    """Coinbase and Kraken over the same connection, publisher and DLQ path, two shards.
    Without a gap fault their ids arrive contiguous: nothing to repair (see below)."""
    symbols = SYMBOLS[:2]
    trades, quotes = new_topic(3), new_topic(3)
    with _sim(f"{venue}:malformed_every=50", rate=200, symbols=symbols) as sim:
        report = ingest(
            venue=venue, symbols=symbols, shard_size=1, simulator_url=sim.http_url,
            validate_mode="on_start", metrics_port=0, run_seconds=4,
            trades_topic=trades, quotes_topic=quotes,
        )  # fmt: skip
    assert len(report["shards"]) == 2 and report["sent"] == report["acked"] > 300
    assert report["gaps_found"] == 0 and report["dead_letters"] == report["bad_frames"] > 0
    ids = trade_ids(kafka, trades, venue=simulated(venue))
    assert sorted(ids) == symbols and all(len(v) > 100 for v in ids.values())
    quoted = {
        codec.decode(r.value).symbol for recs in read_topic(kafka, quotes).values() for r in recs
    }
    assert quoted == set(symbols)


def test_deribit_holes_are_repaired_by_sequence_and_duplicates_dropped(
    kafka, prefect_server, new_topic
):
    """Deribit's trade_seq is contiguous per instrument, so its holes go through the same
    repair as Binance's: read back from REST by sequence range before the next trade is
    published; repeated trades are dropped. Its heartbeat test_request is answered, or
    the simulator would close the connection (as Deribit does) within the run."""
    symbols = ["BTC-USDPERP", "ETH-USDT"]  # a perpetual and a spot pair
    trades, quotes = new_topic(3), new_topic(3)
    with _sim("deribit:gap_every=53,gap_size=2,dup_every=47", rate=200, symbols=symbols) as sim:
        report = ingest(
            venue="deribit", symbols=symbols, simulator_url=sim.http_url,
            validate_mode="off", metrics_port=0, run_seconds=15,
            trades_topic=trades, quotes_topic=quotes,
        )  # fmt: skip
    assert report["sent"] == report["acked"] > 1000 and report["failed"] == 0
    assert report["gaps_repaired"] >= 5 and report["gaps_given_up"] == 0
    assert report["duplicates_dropped"] >= 3 and report["unresolved_at_exit"] == 0
    assert sum(report["reconnects"].values()) == 0, report["reconnects"]
    ids = trade_ids(kafka, trades, venue=simulated("deribit"))
    assert sorted(ids) == sorted(symbols)
    for symbol in symbols:
        assert_contiguous(ids[symbol], symbol)


@pytest.mark.parametrize(
    ("venue", "faults", "seconds"),
    [
        ("coinbase", "gap_every=53,gap_size=2,dup_every=47", 15),
        # Kraken's REST takes about one call a second: holes sparse enough to keep up with
        ("kraken", "gap_every=307,gap_size=2,dup_every=47", 20),
    ],
)
def test_coinbase_and_kraken_holes_are_repaired_by_time_and_duplicates_dropped(
    kafka, prefect_server, new_topic, venue, faults, seconds
):
    """Coinbase's and Kraken's trade ids are sequential per product/pair, but their REST
    serves trades by time only: a hole is read back from REST between the last published
    trade's time and the time of the trade that revealed it, before that trade is
    published; repeated trades are dropped. Coinbase's per-connection sequence_num has no
    hole (a skipped trade is not a lost message)."""
    symbols = SYMBOLS[:2]
    trades, quotes = new_topic(3), new_topic(3)
    with _sim(f"{venue}:{faults}", rate=200, symbols=symbols) as sim:
        report = ingest(
            venue=venue, symbols=symbols, simulator_url=sim.http_url,
            validate_mode="off", metrics_port=0, run_seconds=seconds,
            trades_topic=trades, quotes_topic=quotes,
        )  # fmt: skip
        final = sim.report()
    assert report["sent"] == report["acked"] > 1000 and report["failed"] == 0
    assert report["gaps_repaired"] >= 5 and report["gaps_given_up"] == 0
    assert report["duplicates_dropped"] >= 3 and report["unresolved_at_exit"] == 0
    assert report["sequence_gaps"] == report["messages_missed"] == 0
    assert sum(report["reconnects"].values()) == 0, report["reconnects"]
    ids = trade_ids(kafka, trades, venue=simulated(venue))
    assert sorted(ids) == sorted(symbols)
    for symbol in symbols:
        assert_contiguous(ids[symbol], symbol)
        skipped = final["venues"][venue]["symbols"][symbol]["skipped_ids"]
        assert any(ids[symbol][0] < s < ids[symbol][-1] for s in skipped)


def test_finnhub_trades_flow_through_and_duplicates_are_stored_once(
    kafka, postgres, prefect_server, new_topic
):
    """Finnhub's trades have no ids: each one's trade_id is a hash of its content. The
    simulator repeats trades (dup fault) and sends malformed frames; the repeats reach
    Kafka under the same key as the original (ingestion cannot drop what it cannot tell
    apart by id order), bad frames go to the DLQ, and the price drain stores every distinct
    trade once, also when it reads the topic a second time. Its side is 'unknown', which
    the trades table takes (migration 0500); verify reports no holes for it."""
    from contextlib import closing

    from tasks.core.pg import connect
    from tasks.telemetry.verify import verify_trades
    from tests.drain.support import drain_prices_now, pg_schema

    symbols = ["BTC-USDTBINANCE", "AAPL-USD"]  # BINANCE:BTCUSDT and the stock AAPL
    trades, quotes = new_topic(3), new_topic(3)
    with _sim("finnhub:dup_every=29,malformed_every=61", rate=200, symbols=symbols) as sim:
        report = ingest(
            venue="finnhub", symbols=symbols, simulator_url=sim.http_url,
            validate_mode="on_start", metrics_port=0, run_seconds=6,
            trades_topic=trades, quotes_topic=quotes,
        )  # fmt: skip
        ledger = sim.report()["venues"]["finnhub"]["symbols"]
    assert report["channels"] == ["trades"] and report["gaps_found"] == 0
    assert report["sent"] == report["acked"] > 300 and report["failed"] == 0
    assert report["dead_letters"] == report["bad_frames"] > 0
    venue = simulated("finnhub")
    events = [codec.decode(r.value) for recs in read_topic(kafka, trades).values() for r in recs]
    assert events and all(t.venue == venue and t.side == "unknown" for t in events)
    assert {t.symbol for t in events} == set(symbols)
    in_kafka = Counter((t.symbol, t.trade_id) for t in events)
    repeats = sum(n - 1 for n in in_kafka.values())
    assert repeats >= 5, "the simulator's repeats reach Kafka under the same key"
    assert sum(led["duplicated_count"] for led in ledger.values()) >= 5
    assert read_topic(kafka, quotes) == {p: [] for p in range(3)}  # no quotes on Finnhub

    with pg_schema(postgres.pg_dsn) as schema:
        for consumer in ("finnhub-first", "finnhub-replay"):  # a replay changes nothing
            drain_prices_now(kafka, schema, f"{consumer}-{trades}", [trades])
            with closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT symbol, trade_id, count(*) FROM trades WHERE venue = %s"
                    " GROUP BY symbol, trade_id",
                    (venue,),
                )
                rows = cur.fetchall()
            assert {(s, i) for s, i, _ in rows} == set(in_kafka)
            assert all(n == 1 for _, _, n in rows)
        with closing(connect(postgres.pg_dsn, schema)) as conn:
            verdict = verify_trades(conn, kafka, venue, trades)
    assert verdict.ok, verdict.problems
    assert all(c.holes == 0 and c.missing_from_store == 0 for c in verdict.symbols)
