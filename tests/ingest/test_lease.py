"""One publisher per symbol: the lease in the real PostgreSQL (two holders, expiry, takeover
only after it, tokens, a lost lease reported, the database unreachable for a while, the
keeper renewing and self-fencing; disjoint symbol sets held at once, overlapping ones
waiting, all-or-nothing acquisition, one symbol taken over), the publisher refusing to
send past its lease, and two real ingestion runs of one feed against the simulator:
exactly one publishes, the other waits and takes over when the first stops; a run one of
whose symbols is taken stops.

Waits are liveness bounds with generous margins; nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest

from simulator.process import ROOT, SimulatorProcess
from tasks.core.events import Trade
from tasks.core.kafka import producer
from tasks.drain.migrate import migrate
from tasks.ingest.lease import (
    Keeper,
    Lease,
    LeaseBusy,
    LeaseLost,
    Unreachable,
    clock,
    feed_key,
    lease_key,
)
from tasks.ingest.publish import PRODUCER_TUNING, Fenced, Publisher, Topics
from tests.ingest.support import (
    SIM_VENUE,
    assert_contiguous,
    end_offsets,
    last_json_line,
    trade_ids,
)
from tests.ports import free_port

FEED = "binance:test.trades"
PAIR = ("BTC-USDT", "ETH-USDT")  # the symbols of the class's own leases, unless told
# Short leases for the class's own tests: ttl 3 s, renew every 0.5 s, stop 1 s before expiry.
SHORT = {"ttl_s": 3.0, "renew_every_s": 0.5, "margin_s": 1.0}


def _closed_dsn(dsn: str) -> str:
    """``dsn`` pointed at a local port where nothing listens (connection refused)."""
    return re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", dsn, count=1)


def _wait_for(what: str, predicate: Callable[[], object], timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"gave up after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)
    return result


@pytest.fixture
def schema(postgres) -> Iterator[str]:
    """A private, migrated schema (so the leases table is this test's own)."""
    name = f"t_lease_{uuid.uuid4().hex[:10]}"
    migrate(postgres.pg_dsn, name)
    try:
        yield name
    finally:
        with contextlib.closing(psycopg2.connect(postgres.pg_dsn)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def leases(postgres, schema) -> Iterator[Callable[..., Lease]]:
    """Factory of leases on FEED (of PAIR unless told) in the private schema, closed
    afterwards."""
    made: list[Lease] = []

    def make(owner: str, symbols: tuple[str, ...] = PAIR, **timing: float) -> Lease:
        lease = Lease(postgres.pg_dsn, FEED, symbols, owner, schema=schema, **{**SHORT, **timing})
        made.append(lease)
        return lease

    yield make
    for lease in made:
        lease.close()


def _tokens(token: int, symbols: tuple[str, ...] = PAIR) -> dict[str, int]:
    return dict.fromkeys(symbols, token)


def _row(dsn: str, schema: str, key: str = lease_key(FEED, PAIR[0])) -> dict | None:
    """The lease row of ``key`` (default: PAIR's first symbol's)."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        try:
            cur.execute(
                f"SELECT token, owner, acquired_at, renewed_at, expires_at, released_at"
                f" FROM {schema}.ingest_leases WHERE feed = %s",
                (key,),
            )
        except psycopg2.errors.UndefinedTable:  # no run has migrated this database yet
            return None
        row = cur.fetchone()
    if row is None:
        return None
    keys = ("token", "owner", "acquired_at", "renewed_at", "expires_at", "released_at")
    return dict(zip(keys, row, strict=True))


# ---- the lease itself ----------------------------------------------------------------------


def test_a_second_holder_waits_and_is_told_who_holds_the_lease(leases, caplog):
    a, b = leases("run A"), leases("run B", ttl_s=60)
    assert a.acquire(timeout_s=10) == _tokens(1) and a.held
    caplog.set_level(logging.INFO, logger="tasks.ingest.lease")
    with pytest.raises(LeaseBusy, match=r"BTC-USDT, ETH-USDT held by run A \(token 1\)") as busy:
        b.acquire(timeout_s=1.5, poll_s=0.2)
    assert [h.owner for h in busy.value.holders] == ["run A"]
    assert b.tokens == {} and not b.held
    waiting = [r.getMessage() for r in caplog.records if "waiting for lease" in r.getMessage()]
    assert waiting and "held by run A (token 1)" in waiting[0], waiting
    assert a.renew() and a.held  # the waiter changed nothing


def test_of_many_simultaneous_acquirers_exactly_one_wins(leases):
    contenders = [leases(f"run {i}") for i in range(8)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[int, object] = {}

    def attempt(i: int) -> None:
        start.wait()
        outcomes[i] = contenders[i].try_acquire()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [i for i, outcome in outcomes.items() if outcome is None]
    assert len(outcomes) == len(contenders) and len(winners) == 1, outcomes
    assert [c.tokens for c in contenders if c.tokens] == [_tokens(1)]
    losers = [o for o in outcomes.values() if o is not None]
    assert {h.owner for o in losers for h in o} == {f"run {winners[0]}"}  # type: ignore[attr-defined]


def test_takeover_only_after_expiry_with_a_higher_token(postgres, schema, leases):
    a, b = leases("run A"), leases("run B")
    token_a = a.acquire(timeout_s=10)
    a.renew()
    expires = _row(postgres.pg_dsn, schema)["expires_at"]  # A stops renewing here
    token_b = b.acquire(timeout_s=30, poll_s=0.1)
    row = _row(postgres.pg_dsn, schema)
    # By the database's clock, B got it no earlier than A's lease expired.
    assert row["acquired_at"] >= expires, (row, expires)
    assert token_b == {s: t + 1 for s, t in token_a.items()} == _tokens(2)
    assert row["token"] == 2 and row["owner"] == "run B"
    assert not a.held  # A's own reckoning ran out before B could take over
    with pytest.raises(LeaseLost, match=r"^fenced: .*taken.*held by run B \(token 2\)"):
        a.renew()
    assert a.tokens == {} and "run B" in (a.lost or "")
    assert a.release() is False  # not A's any more: releasing changes nothing
    assert _row(postgres.pg_dsn, schema)["owner"] == "run B"
    assert b.renew() and b.held


def test_release_lets_the_next_holder_in_at_once_and_tokens_keep_growing(postgres, schema, leases):
    a, b = leases("run A", ttl_s=600), leases("run B", ttl_s=600)
    assert a.acquire(timeout_s=10) == _tokens(1)
    assert a.release() is True and a.tokens == {} and not a.held
    assert _row(postgres.pg_dsn, schema)["released_at"] is not None
    assert b.acquire(timeout_s=10) == _tokens(2)  # a 600 s lease: only the release let B in
    assert b.release() is True
    assert a.acquire(timeout_s=10) == _tokens(3)
    with pytest.raises(LeaseBusy):
        b.acquire(timeout_s=0.5, poll_s=0.1)


def test_database_unreachable_for_a_while_does_not_lose_an_unexpired_lease(postgres, leases):
    a = leases("run A", ttl_s=30, margin_s=5)
    b = leases("run B", ttl_s=30)
    tokens = a.acquire(timeout_s=10)
    # The server goes away: A's connection is gone and nothing answers on its address.
    a.dsn = _closed_dsn(postgres.pg_dsn)
    a.close()
    for _ in range(3):
        with pytest.raises(Unreachable, match=r"refused|failed"):
            a.renew()
    assert a.held and a.tokens == tokens and a.remaining() > 0
    with pytest.raises(LeaseBusy, match="held by run A"):
        b.acquire(timeout_s=1, poll_s=0.2)  # not expired: nobody takes it
    # The server is back: the same lease, the same token, renewed.
    a.dsn = postgres.pg_dsn
    a.renew()
    assert a.held and a.tokens == tokens
    with pytest.raises(LeaseBusy):
        b.acquire(timeout_s=0.5, poll_s=0.2)


def test_a_dropped_connection_is_reopened_by_the_next_renewal(postgres, leases):
    """What a PostgreSQL restart looks like to a holder: its backend is gone."""
    a = leases("run A", ttl_s=30, margin_s=5)
    tokens = a.acquire(timeout_s=10)
    backend = a._conn.get_backend_pid()
    with contextlib.closing(psycopg2.connect(postgres.pg_dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            assert cur.fetchone() == (True,), "could not end the lease's backend"
    with pytest.raises(Unreachable):
        a.renew()
    a.renew()
    assert a.held and a.tokens == tokens


def test_the_keeper_rides_out_an_outage_shorter_than_its_lease(postgres, leases):
    # ttl 10 s, renew every 0.5 s, stop 2 s before expiry: ~6 s of outage are harmless.
    a = leases("run A", ttl_s=10, renew_every_s=0.5, margin_s=2)
    a.acquire(timeout_s=10)
    fenced: list[str] = []
    renewed: list[float] = []
    keeper = Keeper(a, fenced.append, renewed.append, retry_s=0.2)
    keeper.start()
    try:
        _wait_for("a first renewal", lambda: renewed, 20)
        a.dsn = _closed_dsn(postgres.pg_dsn)
        a.close()
        outage_from, down_at = len(renewed), clock()
        _wait_for("renewals to fail", lambda: keeper.failures >= 3, 20)
        time.sleep(max(0.0, down_at + 3 - clock()))  # 3 s down: less than 10 - 2 - 0.5
        assert len(renewed) == outage_from and a.held
        a.dsn = postgres.pg_dsn
        _wait_for("renewals to resume", lambda: len(renewed) > outage_from, 20)
    finally:
        assert keeper.stop()
    assert fenced == [] and keeper.verdict is None and a.held


def test_the_keeper_fences_before_a_waiter_can_take_over(postgres, leases):
    a = leases("run A")
    b = leases("run B")
    a.acquire(timeout_s=10)
    fenced_at: list[float] = []
    keeper = Keeper(a, lambda reason: fenced_at.append(clock()), retry_s=0.1)
    keeper.start()
    try:
        a.dsn = _closed_dsn(postgres.pg_dsn)  # A can no longer renew
        a.close()
        b.acquire(timeout_s=60, poll_s=0.05)
        taken_at = clock()
    finally:
        assert keeper.stop()
    assert fenced_at, "A never fenced itself"
    assert fenced_at[0] < taken_at  # A had stopped before B could start
    assert keeper.verdict is not None and keeper.verdict.startswith(
        "fenced: could not renew lease binance:test.trades [BTC-USDT, ETH-USDT] (token 1)"
    ), keeper.verdict
    assert "refused" in keeper.verdict or "failed" in keeper.verdict, keeper.verdict


def test_the_keeper_reports_a_lease_taken_by_another_holder(postgres, schema, leases):
    a = leases("run A", ttl_s=30, margin_s=5)
    a.acquire(timeout_s=10)
    reasons: list[str] = []
    keeper = Keeper(a, reasons.append)
    keeper.start()
    try:
        _steal(postgres.pg_dsn, lease_key(FEED, "ETH-USDT"), schema)
        _wait_for("the keeper to notice", lambda: reasons, 30)
    finally:
        assert keeper.stop()
    assert len(reasons) == 1, reasons
    assert reasons[0].startswith(
        "fenced: lease binance:test.trades [BTC-USDT, ETH-USDT]: ETH-USDT (token 1) was taken;"
    ), reasons
    assert "now ETH-USDT held by a thief (token 2)" in reasons[0], reasons


def _steal(dsn: str, key: str, schema: str = "public") -> None:
    """What a takeover of one symbol's row looks like to the holder (as if its own
    reckoning had failed)."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            f"UPDATE {schema}.ingest_leases SET token = token + 1, holder = 'thief',"
            " owner = 'a thief', acquired_at = now(), renewed_at = now(),"
            " expires_at = now() + interval '10 minutes' WHERE feed = %s RETURNING token",
            (key,),
        )
        assert cur.fetchone(), f"no lease row for {key}"


# ---- symbol sets of one feed ---------------------------------------------------------------


def test_disjoint_symbol_sets_of_one_feed_are_held_at_once(leases):
    a, b = leases("run A", PAIR), leases("run B", ("SOL-USDT", "XRP-USDT"))
    assert a.acquire(timeout_s=5) == _tokens(1)
    assert b.acquire(timeout_s=5) == _tokens(1, ("SOL-USDT", "XRP-USDT"))
    assert a.renew() and b.renew() and a.held and b.held


def test_an_overlapping_set_waits_for_the_shared_symbol_then_takes_them_all(
    postgres, schema, leases
):
    a = leases("run A", PAIR, ttl_s=600)
    b = leases("run B", ("ETH-USDT", "SOL-USDT"), ttl_s=600)
    a.acquire(timeout_s=5)
    with pytest.raises(LeaseBusy, match=r"busy: ETH-USDT held by run A \(token 1\)") as busy:
        b.acquire(timeout_s=1, poll_s=0.2)
    [holder] = busy.value.holders
    assert holder.owner == "run A" and holder.symbols == ("ETH-USDT",)
    assert a.release()  # a 600 s lease: only the release lets B in
    assert b.acquire(timeout_s=5) == {"ETH-USDT": 2, "SOL-USDT": 1}
    assert _row(postgres.pg_dsn, schema, lease_key(FEED, "SOL-USDT"))["owner"] == "run B"


def test_a_waiter_holds_none_of_its_symbols_while_one_is_held(postgres, schema, leases):
    """All or nothing: the free rows a waiter could take stay as they were while it waits."""
    a = leases("run A", ("ETH-USDT",), ttl_s=600)
    c = leases("run C", ("SOL-USDT",), ttl_s=600)
    b = leases("run B", ("BTC-USDT", "ETH-USDT", "SOL-USDT"), ttl_s=600)
    a.acquire(timeout_s=5)
    c.acquire(timeout_s=5)
    assert c.release()  # SOL-USDT: released (a row to take); BTC-USDT: no row yet
    keys = [lease_key(FEED, "BTC-USDT"), lease_key(FEED, "SOL-USDT")]
    free = {key: _row(postgres.pg_dsn, schema, key) for key in keys}
    busy: list[LeaseBusy] = []

    def wait() -> None:
        try:
            b.acquire(timeout_s=3, poll_s=0.1)
        except LeaseBusy as e:
            busy.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    while waiter.is_alive():
        for key, row in free.items():
            assert _row(postgres.pg_dsn, schema, key) == row, key
        time.sleep(0.05)
    assert busy and [h.symbols for h in busy[0].holders] == [("ETH-USDT",)]
    assert b.tokens == {} and a.renew() and a.held


def test_a_live_lease_of_the_whole_feed_from_an_earlier_version_keeps_every_symbol(
    postgres, schema, leases
):
    """An earlier version leased the whole feed (key ``feed_key``): while that row is live
    its run may publish every symbol, so nobody takes any; once it expires, they do."""
    with contextlib.closing(psycopg2.connect(postgres.pg_dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {schema}.ingest_leases (feed, token, holder, owner, acquired_at,"
            " renewed_at, expires_at) VALUES (%s, 4, 'h', 'old run', now(), now(),"
            " now() + interval '10 seconds')",
            (FEED,),
        )
        conn.commit()
    b = leases("run B", ("SOL-USDT",))
    with pytest.raises(LeaseBusy, match=r"every symbol \(an earlier version.*held by old run"):
        b.acquire(timeout_s=0.5, poll_s=0.1)
    assert _row(postgres.pg_dsn, schema, lease_key(FEED, "SOL-USDT")) is None
    assert b.acquire(timeout_s=30, poll_s=0.2) == {"SOL-USDT": 1}  # after its expiry


def test_an_acquirer_frozen_inside_its_transaction_never_stalls_the_holder(postgres, leases):
    """A waiter's acquisition locks the holder's rows until it ends; one that freezes in
    it (here: sleeps before its ROLLBACK) is ended by the server, and renewals go on."""
    a, b = leases("run A", PAIR, ttl_s=60), leases("run B", PAIR, ttl_s=60)
    a.acquire(timeout_s=5)
    locked = threading.Event()
    ended: list[BaseException] = []

    def freeze(cur) -> list:
        cur.execute("BEGIN")
        cur.execute(
            "SELECT 1 FROM ingest_leases WHERE feed = ANY(%s) FOR UPDATE",
            ([lease_key(FEED, s) for s in PAIR],),
        )
        locked.set()
        time.sleep(8)  # longer than a renewal's statement timeout (5 s)
        cur.execute("ROLLBACK")
        return []

    def frozen() -> None:
        try:
            b._call(freeze)
        except Unreachable as e:  # the server ended its session
            ended.append(e)

    waiter = threading.Thread(target=frozen)
    waiter.start()
    assert locked.wait(10), "the frozen acquirer never locked the rows"
    t0 = time.monotonic()
    assert a.renew() and a.held  # waits for the server to end the frozen transaction
    print(f"renewal waited {time.monotonic() - t0:.1f} s for the frozen acquirer")
    waiter.join(15)
    assert ended, "the frozen acquirer's transaction was not ended by the server"


def test_overlapping_acquirers_in_any_order_never_deadlock_or_share_a_symbol(postgres, schema):
    symbols = ["A", "B", "C", "D"]
    sets = [(x, y) for x in symbols for y in symbols if x != y]  # every order of every pair
    contenders = [
        Lease(postgres.pg_dsn, FEED, s, f"run {i}", schema=schema, **SHORT)
        for i, s in enumerate(sets)
    ]
    start = threading.Barrier(len(contenders))
    errors: list[BaseException] = []

    def attempt(lease: Lease) -> None:
        start.wait()
        try:
            lease.try_acquire()
        except Unreachable as e:  # a deadlock the database broke would show up here
            errors.append(e)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in contenders]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [c for c in contenders if c.tokens]
        assert not errors and winners, errors
        taken = [s for c in winners for s in c.tokens]
        assert len(taken) == len(set(taken)), [c.tokens for c in winners]  # pairwise disjoint
        for c in winners:
            for symbol in c.tokens:
                assert _row(postgres.pg_dsn, schema, lease_key(FEED, symbol))["owner"] == c.owner
    finally:
        for c in contenders:
            c.close()


def test_a_holder_one_of_whose_symbols_was_taken_loses_the_lease_naming_it(
    postgres, schema, leases
):
    a = leases("run A", ("BTC-USDT", "ETH-USDT", "SOL-USDT"), ttl_s=30, margin_s=5)
    a.acquire(timeout_s=5)
    _steal(postgres.pg_dsn, lease_key(FEED, "ETH-USDT"), schema)
    with pytest.raises(
        LeaseLost,
        match=r"^fenced: lease \S+ \[BTC-USDT, ETH-USDT, SOL-USDT\]: ETH-USDT \(token 1\) was "
        r"taken; now ETH-USDT held by a thief \(token 2\)",
    ):
        a.renew()
    assert not a.held and a.tokens == {"BTC-USDT": 1, "SOL-USDT": 1}
    with pytest.raises(LeaseLost, match="not held"):
        a.renew()
    assert a.release() is True and a.tokens == {}  # the rows still its own, at once
    for symbol in ("BTC-USDT", "SOL-USDT"):
        assert _row(postgres.pg_dsn, schema, lease_key(FEED, symbol))["released_at"] is not None
    stolen = _row(postgres.pg_dsn, schema, lease_key(FEED, "ETH-USDT"))
    assert stolen["owner"] == "a thief" and stolen["released_at"] is None


# ---- the publisher keeps to its lease ------------------------------------------------------


def test_a_publisher_refuses_to_send_past_its_lease(kafka, new_topic):
    topic = new_topic(1)
    publisher = Publisher(producer(kafka, **PRODUCER_TUNING), "binance", Topics(topic, topic))
    lane = publisher.lane("0")
    now_us = time.time_ns() // 1000
    trades = [
        Trade("binance", "BTC-USDT", "BTCUSDT", i, Decimal("100.5"), Decimal("0.1"), "buy",
              now_us, now_us)
        for i in range(1, 7)
    ]  # fmt: skip
    publisher.valid_until = clock() + 600
    for t in trades[:3]:
        lane.publish(t)
    publisher.flush(30)
    publisher.valid_until = clock() - 0.001  # the lease's fence point has passed
    with pytest.raises(Fenced, match=r"^fenced: the lease was not renewed in time"):
        lane.publish(trades[3])
    publisher.extend(clock() + 600)  # a late renewal does not reopen a fenced publisher
    with pytest.raises(Fenced):
        lane.publish(trades[4])
    with pytest.raises(Fenced):
        lane.dead_letter("test", "bad", b"{}")
    assert publisher.close(5) == 0
    assert lane.sent == lane.acked == 3 and publisher.fatal is None
    sent = trade_ids(kafka, topic, venue="binance")  # made here, named as a live feed
    assert sorted(i for ids in sent.values() for i in ids) == [t.trade_id for t in trades[:3]]


# ---- two ingestion runs of one feed --------------------------------------------------------

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]


def _ingestion(sim: SimulatorProcess, trades: str, seconds: float, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "flows.ingest", "--simulator", sim.http_url,
        "--symbols", ",".join(SYMBOLS), "--channels", "trades", "--trades-topic", trades,
        "--validate", "off", "--metrics-port", "0", "--progress-every", "2",
        "--seconds", str(seconds),
    ]  # fmt: skip
    out = log.with_suffix(".out").open("wb")
    err = log.with_suffix(".err").open("wb")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
    finally:
        out.close()
        err.close()


def _text(log: Path, suffix: str) -> str:
    return log.with_suffix(suffix).read_text(errors="replace")


def _holder_pid(dsn: str, key: str) -> int | None:
    row = _row(dsn, "public", key)
    if row is None or row["released_at"] is not None:
        return None
    return int(re.search(r" pid (\d+)$", row["owner"]).group(1))  # type: ignore[union-attr]


@pytest.fixture
def public_lease_rows(postgres) -> Iterator[list[str]]:
    """Keys of the rows in public.ingest_leases a test leaves behind (deleted afterwards)."""
    keys: list[str] = []
    yield keys
    with (
        contextlib.closing(psycopg2.connect(postgres.pg_dsn)) as conn,
        conn,
        conn.cursor() as cur,
        contextlib.suppress(psycopg2.Error),
    ):
        cur.execute("DELETE FROM public.ingest_leases WHERE feed = ANY(%s)", (keys,))


def _feed_lease(trades: str, public_lease_rows: list[str]) -> tuple[str, str]:
    """The lease of SYMBOLS of the simulator's venue into ``trades``: its name in logs and
    its first symbol's key (every row of a run has the same holder)."""
    feed = feed_key(SIM_VENUE, trades)
    public_lease_rows.extend(lease_key(feed, s) for s in SYMBOLS)
    return f"{feed} [{', '.join(SYMBOLS)}]", lease_key(feed, SYMBOLS[0])


def _stopped_report(log: Path) -> dict:
    """The report a run logs when it stops (also after SIGTERM)."""
    err = _text(log, ".err")
    assert "stopped: " in err, err[-3000:]
    return last_json_line(err.split("stopped: ", 1)[1].splitlines()[0])


def test_two_ingestions_of_one_feed_publish_every_trade_once(
    kafka, postgres, prefect_server, new_topic, tmp_path, public_lease_rows
):
    trades = new_topic(3)
    name, key = _feed_lease(trades, public_lease_rows)
    logs = [tmp_path / "run-1", tmp_path / "run-2"]
    with SimulatorProcess("--symbols", ",".join(SYMBOLS), "--rate", "200") as sim:
        runs = [_ingestion(sim, trades, 900, log) for log in logs]  # started together
        try:

            def alive() -> None:
                for r, log in zip(runs, logs, strict=True):
                    assert r.poll() is None, f"a run ended early: {_text(log, '.err')[-3000:]}"

            def one_publishing() -> int | None:
                alive()
                holder = _holder_pid(postgres.pg_dsn, key)
                return holder if sum(end_offsets(kafka, trades).values()) > 0 else None

            holder = _wait_for("one run to take the lease and publish", one_publishing, 180)
            first_i = [r.pid for r in runs].index(holder)
            first, second = runs[first_i], runs[1 - first_i]
            first_log, second_log = logs[first_i], logs[1 - first_i]

            def second_waits() -> bool:
                alive()
                waiting = f"waiting for lease {name}: {', '.join(SYMBOLS)} held by"
                return waiting in _text(second_log, ".err")

            _wait_for("the second run to wait for the lease", second_waits, 180)
            # While the first holds the lease, the second never starts streaming. (Its log
            # is read before the lease row: a row still the first's then means the log was
            # read before the second could have taken over.)
            for _ in range(10):
                alive()
                waiting = _text(second_log, ".err")
                row = _row(postgres.pg_dsn, "public", key)
                assert row["token"] == 1 and row["released_at"] is None, row
                assert f"pid {first.pid} (token 1)" in waiting, waiting[-3000:]
                assert "streaming binance" not in waiting, waiting[-3000:]
                time.sleep(0.3)
            # The first stops cleanly (as on cancellation) and releases: the second takes
            # over and publishes.
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=120)
            assert f"lease {name} released" in _text(first_log, ".err")
            by_first = sum(end_offsets(kafka, trades).values())

            def second_publishing() -> bool:
                assert second.poll() is None, _text(second_log, ".err")[-3000:]
                return (
                    _holder_pid(postgres.pg_dsn, key) == second.pid
                    and sum(end_offsets(kafka, trades).values()) > by_first + 300
                )

            _wait_for("the second run to take over and publish", second_publishing, 120)
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=120)
        finally:
            for r in runs:
                if r.poll() is None:
                    r.kill()
                    r.wait(10)

    reports = [_stopped_report(log) for log in (first_log, second_log)]
    assert [r["lease"]["tokens"] for r in reports] == [
        _tokens(1, tuple(SYMBOLS)),
        _tokens(2, tuple(SYMBOLS)),
    ], [r["lease"] for r in reports]
    assert all(r["lease"]["fenced"] is None for r in reports)
    assert all(r["unresolved_at_exit"] == 0 and r["failed"] == 0 for r in reports), reports
    ids = trade_ids(kafka, trades)
    assert sorted(ids) == sorted(SYMBOLS)
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)  # every id once: no duplicate, no hole
    assert sum(map(len, ids.values())) == reports[0]["acked"] + reports[1]["acked"]
    for symbol, last in reports[0]["last_trade_ids"].items():
        assert reports[1]["last_trade_ids"][symbol] > last  # the second continued the feed


def test_a_run_whose_lease_is_taken_stops_publishing(
    kafka, postgres, prefect_server, new_topic, tmp_path, public_lease_rows
):
    trades = new_topic(3)
    name, key = _feed_lease(trades, public_lease_rows)
    stolen = lease_key(feed_key(SIM_VENUE, trades), "ETH-USDT")
    log = tmp_path / "run"
    with SimulatorProcess("--symbols", ",".join(SYMBOLS), "--rate", "200") as sim:
        run = _ingestion(sim, trades, 120, log)
        try:

            def publishing() -> bool:
                assert run.poll() is None, _text(log, ".err")[-3000:]
                return (
                    _holder_pid(postgres.pg_dsn, key) == run.pid
                    and sum(end_offsets(kafka, trades).values()) > 100
                )

            _wait_for("the run to take the lease and publish", publishing, 180)
            _steal(postgres.pg_dsn, stolen)
            code = run.wait(timeout=120)  # its next renewal (every 5 s) finds it taken
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
    err = _text(log, ".err")
    assert code != 0, err[-3000:]
    fenced = f"fenced: lease {name}: ETH-USDT (token 1) was taken; now ETH-USDT held by a thief"
    assert fenced in err, err[-3000:]
    report = _stopped_report(log)
    assert report["lease"]["fenced"].startswith(fenced)
    assert _row(postgres.pg_dsn, "public", stolen)["owner"] == "a thief"  # left to the new holder
    # The symbols still its own were released when it stopped: nobody waits a TTL for them.
    assert f"lease {name} released" in err, err[-3000:]
    assert _row(postgres.pg_dsn, "public", key)["released_at"] is not None
    ids = trade_ids(kafka, trades)
    for symbol in SYMBOLS:
        assert_contiguous(ids[symbol], symbol)
    # Nothing was handed to Kafka after the fence: the topic holds what the run acked, plus
    # at most the few records already on their way when it dropped the rest.
    assert report["acked"] <= sum(map(len, ids.values())) <= report["sent"], (
        report["acked"],
        report["sent"],
    )
