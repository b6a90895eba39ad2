"""The whole platform on this machine, in one command (the README's main job).

    python -m deployments.platform               # run until Ctrl-C
    python -m deployments.platform --minutes 2   # run two minutes, verify, exit non-zero on loss
    python -m deployments.platform --live        # the same flows on live Binance (needs internet)

Runbook: bring up the local stack (Kafka, PostgreSQL, MongoDB protocol, Prefect); register
the work pool, blocks and deployments; start the exchange simulator, the lag exporter, a
Pushgateway and a Prefect worker; start the ingestion and trading-activity deployments;
let the scheduled drains and aggregation run; print a live summary. On exit: cancel the
long runs, drain what is left, verify nothing was lost or doubled.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pymongo
from kafka.admin import OffsetSpec

from blocks import prefect_api
from deployments import local
from deployments import setup as deployment_setup
from deployments.reaper import AGGREGATE, DRAINS, REAP_EVERY_S, reap, run_deployment
from stack.services import services, up
from tasks import venues
from tasks.core import config
from tasks.core.kafka import admin
from tasks.core.topics import BOOKS, QUOTES, TRADES, USER_TRANSACTIONS, ensure_topics
from tasks.core.wallets import fold_transactions, wallet_balances
from tasks.ingest.resume import last_trades
from tasks.telemetry import verify
from tasks.telemetry.exporter import consumer_lag

SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT"]
INGEST = {"simulator": "ingest/simulator-feed", "live": "ingest/binance-live"}
TRADING = "trading-activity/simulator"
# A last drain after the load stopped: reads until caught up, then ends (the scheduled runs
# follow the topics until the next one takes over).
FINAL_DRAIN = {"follow": False}


def cancel(run_ids: list) -> None:
    """Ask the worker to cancel long runs and wait until they have stopped cleanly. A run
    whose worker died (its process lives on, in a session of its own) is never cancelled
    by the new worker: after 60 s its local process gets SIGTERM (``_terminate``)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        for rid in run_ids:
            with suppress(Exception):
                # A run no worker has picked up has no process to stop: it ends at once. A
                # run awaiting a retry is Scheduled too, but its process lives and waits:
                # that one is cancelled through its worker like any running one.
                run = client.read_flow_run(rid)
                waiting = run.state.is_scheduled() and not run.infrastructure_pid
                client.set_flow_run_state(rid, Cancelled() if waiting else Cancelling(), force=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = [client.read_flow_run(rid) for rid in run_ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return
            time.sleep(1)
        for r in runs:
            if r.state is None or not r.state.is_final():
                _terminate(r.infrastructure_pid)


def _terminate(pid: str | None) -> None:
    """SIGTERM a flow-run process of this machine (Prefect's process worker records the pid;
    anything else under that pid is left alone)."""
    if pid and pid.isdigit() and not deployment_setup.process_gone(pid):
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


def snapshot(settings: config.Settings) -> dict[str, Any]:
    """Messages in, rows stored, candles, lag: what the live summary prints."""
    out: dict[str, Any] = {}
    client = admin(settings)
    try:
        ends = client.list_partition_offsets(
            {
                tp: OffsetSpec.LATEST
                for tp in _partitions(client, (TRADES, QUOTES, USER_TRANSACTIONS))
            }
        )
        for topic in (TRADES, QUOTES, USER_TRANSACTIONS):
            out[topic] = sum(o.offset for tp, o in ends.items() if tp.topic == topic)
        out["lag"] = sum(consumer_lag(client).values())
    finally:
        client.close()
    with psycopg2.connect(settings.pg_reader_dsn) as conn, conn.cursor() as cur:
        for table in ("trades", "quotes", "candles", "book_snapshots"):
            try:
                cur.execute(f"SELECT count(*) FROM {table}")
                out[table] = cur.fetchone()[0]
            except psycopg2.Error:
                conn.rollback()
                out[table] = "-"
    with pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=3000) as m:
        db = m[settings.mongo_db]
        out["transactions"] = db.transactions.estimated_document_count()
        out["wallets"] = db.wallets.estimated_document_count()
    return out


def _partitions(client, topics):
    from kafka import TopicPartition

    return [
        TopicPartition(t["name"], p["partition_index"])
        for t in client.describe_topics(list(topics))
        for p in t["partitions"]
    ]


def where(settings: config.Settings) -> str:
    pg = urlsplit(settings.pg_dsn)
    ui = settings.prefect_api_url.removesuffix("/api")
    return "\n".join(
        [
            f"  Prefect UI        {ui}",
            f"  Kafka             {','.join(settings.kafka.bootstrap)}",
            f"  PostgreSQL        {pg.hostname}:{pg.port}{pg.path} (user {pg.username})",
            f"  MongoDB protocol  {config.redact(settings.mongo_url)} (db {settings.mongo_db})",
            f"  simulator         {settings.simulator_url}",
            f"  metrics           ingestion http://127.0.0.1:{settings.metrics_port}/metrics,"
            f" exporter http://127.0.0.1:{local.EXPORTER_PORT}/metrics,"
            f" pushgateway http://127.0.0.1:{local.PUSHGATEWAY_PORT}/metrics",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deployments.platform",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, help="run this long, then verify and exit")
    p.add_argument("--live", action="store_true", help="ingest live Binance, not the simulator")
    p.add_argument("--symbols", default=",".join(SYMBOLS))
    p.add_argument("--every", type=float, default=15.0, help="seconds between summary lines")
    p.add_argument("--keep", action="store_true", help="leave worker and simulator running")
    args = p.parse_args(argv)
    settings = config.load()
    # This process talks to the stack's Prefect server, never a temporary one.
    with prefect_api(settings):
        return run_platform(args, settings)


def run_platform(args: argparse.Namespace, settings: config.Settings) -> int:
    symbols = [s for s in args.symbols.split(",") if s]
    print("stack:", up(services(settings)))
    ensure_topics(settings)
    if deployment_setup.main([]) != 0:
        return 2
    since_us = time.time_ns() // 1000
    # A new simulator continues each symbol's ids after what Kafka already holds.
    venue = stored_venue(settings, args.live)
    last = last_trades(settings, TRADES, venue, symbols)
    sides = local.sides(
        settings,
        symbols,
        simulate=not args.live,
        start_ids={s: t.trade_id + 1 for s, t in last.items()},
    )
    try:
        for side in sides:  # a fresh set: a simulator left from an earlier run has old ids
            side.down(settings.home)
            print(f"{side.name:12} {side.up(settings.home)}")
        print("Tapeline is running:\n" + where(settings))
        # This command owns the feed and the trading activity: runs of them left by an
        # earlier one (killed, or a Crashed run its trigger started again) stop first.
        feeds = (INGEST["live" if args.live else "simulator"], TRADING)
        if left := live_or_due(feeds):
            print(f"stopping {len(left)} ingestion or trading run(s) an earlier run left")
            cancel(left)
        ingest = run_deployment(feeds[0], symbols=symbols)
        trading = run_deployment(TRADING)
        start_drains()
        print(
            f"started ingestion run {ingest.name} and trading run {trading.name};"
            " the drains follow the topics, the aggregation runs every minute"
        )
        watch(settings, args.minutes, args.every)
        print("stopping ingestion and trading, draining what is left ...")
        # Its own runs, and any a trigger started in their place meanwhile.
        cancel(list(dict.fromkeys([ingest.id, trading.id, *live_or_due(feeds)])))
        # The following drains would read on for minutes after we exit, and hold the slots
        # the last drains need: they stop first, the last drains read until caught up.
        cancel(following_runs())
        for name in (*DRAINS, AGGREGATE):
            final = FINAL_DRAIN if name in DRAINS else {}
            state = run_deployment(name, wait_s=300, **final).state
            print(f"  {name}: {state.name if state else '?'}")
        return report(settings, venue, since_us)
    finally:
        if not args.keep:
            for side in reversed(sides):
                side.down(settings.home)


def start_drains() -> None:
    """Start a following run of each drain now, rather than at its next schedule (up to 5
    minutes away); the scheduled runs take over from these."""
    for name in DRAINS:
        run_deployment(name)


def following_runs() -> list:
    """Ids of the drains' runs still live (the scheduled ones follow their topics), and of
    those due within a minute (one the reaper started may not have begun yet)."""
    return live_or_due(DRAINS)


def live_or_due(names: tuple[str, ...]) -> list:
    """Ids of the deployments' runs that are live (Pending, Running, Cancelling) or due
    within a minute."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ids = [client.read_deployment_by_name(name).id for name in names]
        soon = datetime.now(UTC) + timedelta(minutes=1)
        due = [r.id for i in ids for r in deployment_setup.due_runs(client, i, soon)]
        return [r.id for r in deployment_setup.live_runs(client, ids)] + due


def watch(settings: config.Settings, minutes: float | None, every: float) -> None:
    """Print a summary line every ``every`` s until the deadline, Ctrl-C or SIGTERM, and
    end orphaned scheduled runs every ``REAP_EVERY_S``."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    deadline = time.monotonic() + minutes * 60 if minutes else None
    next_reap = time.monotonic() + REAP_EVERY_S
    try:
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(every)
            stamp = time.strftime("%H:%M:%S")
            if time.monotonic() >= next_reap:
                next_reap = time.monotonic() + REAP_EVERY_S
                for line in reap(local_pids=True):
                    print(f"[{stamp}] {line}", flush=True)
            try:
                s = snapshot(settings)
            except Exception as e:  # a summary line is informative; the run goes on
                print(f"[{stamp}] summary unavailable: {e}", flush=True)
                continue
            print(
                f"[{stamp}] in: trades {s[TRADES]} quotes {s[QUOTES]} txs"
                f" {s[USER_TRANSACTIONS]} | stored: trades {s['trades']} quotes {s['quotes']}"
                f" candles {s['candles']} books {s['book_snapshots']} txs {s['transactions']}"
                f" wallets {s['wallets']}"
                f" | lag {s['lag']}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass


def stored_venue(settings: config.Settings, live: bool) -> str:
    """The venue name this run's trades carry: ``binance``, or ``binance-sim`` from the
    simulator (never stored as the real venue)."""
    return venues.venue_config("binance", None if live else settings.simulator_url).name


def report(settings: config.Settings, venue: str, since_us: int) -> int:
    """Verify what this run stored; 0 when nothing was lost or doubled."""
    with psycopg2.connect(settings.pg_reader_dsn) as conn:
        verdict = verify.verify_trades(conn, settings, venue, TRADES, since_us)
        books = verify.verify_books(conn, settings, venue, BOOKS, since_us)
    for c in verdict.symbols:
        print(
            f"  {c.symbol}: {c.stored} trades stored, ids {c.first_id}..{c.last_id},"
            f" {c.holes} missing, {c.duplicates_in_kafka} duplicated in Kafka"
        )
    with pymongo.MongoClient(settings.mongo_url) as m:
        db = m[settings.mongo_db]
        wallets_ok = wallet_balances(db) == fold_transactions(db)
    print(f"  wallets {'equal' if wallets_ok else 'DIFFER FROM'} the fold of stored transactions")
    if books.books:
        print(
            f"  books: {books.books}, {books.snapshots_in_kafka} snapshots and"
            f" {books.deltas_in_kafka} deltas in Kafka, {books.stored} snapshots stored,"
            f" {books.missing_from_store} missing, {books.seq_breaks} deltas out of sequence"
        )
    problems = verdict.problems or ([] if verdict.symbols else ["no trades stored"])
    problems += books.problems
    if not wallets_ok:
        problems.append("wallet balances differ from the stored transactions")
    if problems:
        print("LOSS OR DUPLICATION:\n  " + "\n  ".join(problems))
        return 1
    also = "; every book snapshot stored once, every delta in sequence" if books.books else ""
    print(f"zero loss: every trade id once, no holes; wallets match their transactions{also}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
