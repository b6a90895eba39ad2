"""Ingestion: a venue's WebSocket trades and quotes into Kafka, until cancelled.

Runbook of one run:

1. Plan: venue adapter, symbols, channels, shards (a bad parameter fails here).
2. Lease (``acquire-lease``): one publisher per symbol of a feed (venue + trades topic).
   The run takes the lease of all its symbols in PostgreSQL before anything connects,
   waiting (and logging who holds which) while another live run has any of them; runs of
   disjoint symbol sets run side by side. See ``tasks/ingest/lease.py``.
3. Validate (``validate_mode='on_start'`` or ``'only'``): Kafka answers, topics exist, each
   shard delivers a first message. 'only' returns the report and stops (and takes no
   lease: it publishes nothing); 'on_start' asks a silent feed up to 3 times before the
   run fails.
4. Resume: read the last published trade per symbol back from Kafka (after the lease:
   the previous holder has stopped by then, so this is really the last one): its id, and
   its time, from which venues with REST by time (Coinbase, Kraken) look for the rest.
5. Stream: one thread per shard (a long-running ``connect-shard`` task each), one shared
   producer; gaps are repaired from REST as ``repair-gap`` tasks. With ``processes`` N > 1
   the shards are spread over N supervised child processes instead, each with its own
   producer (``tasks/ingest/processes.py``: a child that dies is restarted, one that
   keeps dying fails the run; the children's shards and repairs are not Prefect tasks).
   A progress line is logged every ``progress_every_s``. A thread renews the lease every
   5 s (and passes each new fence point to the children); if it was taken, or could not
   be renewed for ~35 s, publishing stops at once and the run fails "fenced: ...".
6. Shutdown (cancellation, SIGTERM, Ctrl-C or ``run_seconds``): stop reading, flush the
   producer, close sockets, release the lease (so the next run need not wait out its
   TTL), log and return the counts.

Per-message work never touches Prefect: its run recorder could not keep up, and the
connection, publisher and gap tracker in ``tasks/`` do not need it.

Also a command: ``python -m flows.ingest --venue binance --symbols BTC-USDT,ETH-USDT
--simulator`` runs the same flow function (see ``--help``).
"""

# No ``from __future__ import annotations`` here: Prefect validates flow parameters
# against these annotations, and a run that unpickles the flow (``flow.serve``) sees only
# the globals the function body uses, so a string annotation such as ``Literal[...]``
# could not be resolved there.
import argparse
import json
import os
import socket
import sys
import threading
import time
import uuid
from functools import partial
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from blocks import venue_credential
from flows.common import (
    checked,
    migrate_schema,
    sigterm_noticed,
    stop_if_terminated,
    watch_ending,
)
from tasks import venues
from tasks.core import config, metrics, params
from tasks.core.codec import MAX_BOOK_DEPTH
from tasks.core.events import Trade
from tasks.core.topics import BOOKS, QUOTES, TRADES
from tasks.ingest import resume
from tasks.ingest.gaps import GapTracker
from tasks.ingest.lease import Keeper, Lease, LeaseLost, Unreachable, feed_key
from tasks.ingest.live import CHANNELS, Ingestion, Plan, ShardWorker, freeze_heap, plan
from tasks.ingest.processes import Supervisor
from tasks.ingest.publish import ProducerDied, Topics
from tasks.ingest.validate import check, only_first_messages_failed
from tasks.ingest.validate import validate as run_checks
from tasks.venues.connection import ConnectionPolicy

DEFAULT_SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT", "XRP-USDT", "DOGE-USDT"]
_serving: set[int] = set()  # metrics ports this process already serves
MAX_PROCESSES = 64


@task(name="acquire-lease", cache_policy=NO_CACHE, task_run_name="acquire lease {lease.feed}")
def acquire_lease(lease: Lease) -> dict[str, int]:
    """Wait until no other live run holds any of the run's symbols, then take them all;
    returns each symbol's token."""
    return lease.acquire(logger=get_run_logger())


@task(name="validate", cache_policy=NO_CACHE)
def validate_ingestion(
    p: Plan, settings: config.Settings, topics: Topics, timeout_s: float
) -> dict[str, Any]:
    return run_checks(p, settings, topics, timeout_s)


@task(name="resume-point", cache_policy=NO_CACHE)
def resume_point(settings: config.Settings, topic: str, p: Plan) -> dict[str, Trade]:
    """Last published trade per symbol, from the topic itself."""
    return resume.last_trades(settings, topic, p.config.name, list(p.symbols))


@task(name="connect-shard", cache_policy=NO_CACHE, task_run_name="connect shard {worker.shard}")
def connect_shard(worker: ShardWorker) -> dict[str, Any]:
    """Connect, stream and reconnect until the flow stops this shard."""
    return worker.run()


@task(name="repair-gap", cache_policy=NO_CACHE, task_run_name="repair {symbol} {first}..{last}")
def repair_gap(
    tracker: GapTracker, symbol: str, first: int, last: int | None, end_us: int | None = None
) -> int:
    """Publish the trades with ids first..last from the venue's REST history."""
    return tracker.fill(symbol, first, last, end_us)


def _check(
    venue: str,
    symbols: list[str] | None,
    trades_topic: str,
    quotes_topic: str,
    books_topic: str,
    book_depth: int,
    book_snapshot_s: float,
    max_in_flight: int,
    stall_timeout_s: float,
    first_message_timeout_s: float,
    run_seconds: float | None,
    validate_mode: str,
    processes: int = 1,
    **_: Any,
) -> None:
    """Refused before the run starts; in validate_mode 'only' a bad venue or symbol is
    what the report is for, so those two are left to it."""
    if validate_mode != "only":
        params.venue(venue, venues.VENUES)
        if symbols is not None:
            params.symbols(symbols)
    params.topic("trades_topic", trades_topic, params.NOT_PRICES)
    params.topic("quotes_topic", quotes_topic, params.NOT_PRICES)
    params.topic("books_topic", books_topic, params.NOT_PRICES)
    params.number("book_depth", book_depth, 1, MAX_BOOK_DEPTH)
    params.number("book_snapshot_s", book_snapshot_s, 0.1, 3600)
    params.number("max_in_flight", max_in_flight, 1, 1_000_000)
    params.number("stall_timeout_s", stall_timeout_s, 1, 3600)
    params.number("first_message_timeout_s", first_message_timeout_s, 1, 3600)
    if run_seconds is not None:
        params.number("run_seconds", run_seconds, 0, 366 * 86_400)
    params.whole("processes", processes, 1, MAX_PROCESSES)


@checked(_check)
@flow(name="ingest")
def ingest(
    venue: str = "binance",
    symbols: list[str] | None = None,
    channels: list[str] | None = None,
    shard_size: int | None = None,
    validate_mode: Literal["off", "on_start", "only"] = "on_start",
    simulator_url: str | None = None,
    metrics_port: int | None = None,
    stall_timeout_s: float = 30.0,
    run_seconds: float | None = None,
    trades_topic: str = TRADES,
    quotes_topic: str = QUOTES,
    max_in_flight: int = 10_000,
    progress_every_s: float = 10.0,
    first_message_timeout_s: float = 15.0,
    books_topic: str = BOOKS,
    book_depth: int = 10,
    book_snapshot_s: float = 10.0,
    processes: int = 1,
) -> dict[str, Any]:
    """Stream ``symbols`` of ``venue`` (a name in ``tasks.venues.REGISTRY``) into Kafka.

    ``simulator_url`` points the venue's URLs at the local simulator; ``metrics_port``
    None uses TAPELINE_METRICS_PORT, 0 serves none; ``run_seconds`` None runs until
    cancelled. Channel 'books' (asked for by name) publishes each verified order book's
    top ``book_depth`` levels: a snapshot every ``book_snapshot_s`` of event time and the
    deltas between. ``processes`` > 1 spreads the shards over that many supervised child
    processes (at most one per shard), the flow run serving all of their metrics on
    ``metrics_port``, labelled ``process``.
    Returns the run's counts (or, with validate_mode='only', the report).
    """
    logger = get_run_logger()
    terminated = sigterm_noticed()  # a SIGTERM Python swallowed (see _watch)
    settings = config.load()
    topics = Topics(trades_topic, quotes_topic, books_topic)
    try:
        p = plan(
            venue, symbols or DEFAULT_SYMBOLS, channels, shard_size, simulator_url,
            credential=venue_credential(venue, simulator_url), book_depth=book_depth,
            book_snapshot_s=book_snapshot_s,
        )  # fmt: skip
    except ValueError as e:
        if validate_mode == "only":
            return {"ok": False, "checks": [check("configuration", False, str(e))]}
        raise
    if validate_mode == "only":
        return _validate(p, settings, topics, first_message_timeout_s, logger)

    run_id = str(flow_run.id or uuid.uuid4())
    migrate_schema(settings, "public")  # the leases' table is there (the owner made it)
    feed = feed_key(p.config.name, trades_topic)
    lease = Lease(settings.pg_writer_dsn, feed, p.symbols, _owner(run_id))
    tokens = acquire_lease(lease)
    fenced: str | None = None
    try:
        if validate_mode != "off":
            checks = _validate(p, settings, topics, first_message_timeout_s, logger)
            for attempt in range(2, FIRST_MESSAGE_TRIES + 1):
                if checks["ok"] or not only_first_messages_failed(checks):
                    break
                logger.warning(
                    "validation: a shard had no first message; trying again (%d of %d)",
                    attempt, FIRST_MESSAGE_TRIES,
                )  # fmt: skip
                checks = _validate(p, settings, topics, first_message_timeout_s, logger)
            if not checks["ok"]:
                failed = [c["check"] for c in checks["checks"] if not c["ok"]]
                raise RuntimeError(f"validation failed: {', '.join(failed)}")
        port = settings.metrics_port if metrics_port is None else metrics_port
        if processes == 1:  # else the Supervisor serves its children's metrics on it
            _serve_metrics(port, settings.listen_host, logger)
        last = resume_point(settings, trades_topic, p) if p.repairs_gaps else {}
        last_ids = {s: t.trade_id for s, t in last.items()}
        logger.info("resuming from %d known trade ids: %s", len(last_ids), last_ids)

        policy = ConnectionPolicy(stall_timeout_s=stall_timeout(p, stall_timeout_s, logger))
        ingestion: Ingestion | Supervisor
        if processes == 1:
            ingestion = Ingestion(
                p, settings, run_id=run_id, topics=topics, max_in_flight=max_in_flight,
                policy=policy, last_trades=last,
            )  # fmt: skip
            for w in ingestion.workers:
                if w.tracker is not None:
                    w.tracker.fill_gap = partial(repair_gap, w.tracker)
        else:
            ingestion = Supervisor(
                p, settings, processes, run_id=run_id, topics=topics,
                max_in_flight=max_in_flight, policy=policy, last_trades=last,
                metrics_port=port, logger=logger,
            )  # fmt: skip
        # Publishing is allowed until the lease's fence point; each renewal moves it on.
        # Renewed here first: validation and the resume scan may have taken a while.
        try:
            lease.renew()
        except Unreachable as e:  # still ours until fence_at; the keeper retries
            logger.warning("lease %s: renewal before streaming failed: %s", lease.name, e)
        ingestion.extend(lease.fence_at)
        keeper = Keeper(lease, ingestion.fence, ingestion.extend, logger=logger)
        keeper.start()
        where = f"{len(p.shards)} shards"
        if isinstance(ingestion, Supervisor):
            where += f" in {len(ingestion.slots)} processes"
        logger.info(
            "streaming %s %s for %d symbols on %s",
            p.config.name, "+".join(p.channels), len(p.symbols), where,
        )  # fmt: skip
        if isinstance(ingestion, Supervisor):
            ingestion.start()
        else:
            freeze_heap()
            ingestion.start(connect_shard)
        ended = threading.Event()  # the server ended this run (see watch_ending)
        watch_ending(ended)
        try:
            if isinstance(ingestion, Supervisor) and not ingestion.wait_started(60.0):
                logger.warning("not every process streams after 60 s: %s", ingestion.progress())
            _watch(ingestion, run_seconds, progress_every_s, logger, ended, terminated)
        finally:
            ended.set()  # the watch thread stops too
            fenced = ingestion.fence_reason()
            if fenced is not None:
                fenced = keeper.verdict or fenced
                ingestion.fence(fenced)
            # Flush only while the lease surely holds (the keeper renews meanwhile).
            report = ingestion.stop(flush_timeout_s=max(0.0, min(30.0, lease.remaining())))
            keeper.stop()
            report["lease"] = {
                "feed": lease.feed,
                "tokens": tokens,
                "renewals": keeper.renewals,
                "failed_renewals": keeper.failures,
                "fenced": fenced,
            }
            logger.info(
                "stopped: %s", json.dumps({k: v for k, v in report.items() if k != "shards"})
            )
    finally:
        # After the producer has closed: every record of ours is in (or dropped) by now.
        # (A lease taken by another run is no longer ours to release: a no-op then.)
        if lease.release():
            logger.info("lease %s released", lease.name)
        lease.close()
    if fenced is not None:
        raise LeaseLost(f"{fenced} (published until then: {report['acked']} acked)")
    if isinstance(ingestion, Supervisor) and ingestion.failed is not None:
        raise RuntimeError(f"ingestion stopped: {ingestion.failed}")
    if isinstance(ingestion, Ingestion) and isinstance(ingestion.publisher.fatal, ProducerDied):
        # Infrastructure, not data: end the run Crashed, which the deployment's trigger
        # restarts with a new process and producer (the lease is released above).
        raise SystemExit(f"ingestion stopped: {ingestion.publisher.fatal}")
    if report["shard_errors"] or report["producer_error"]:
        raise RuntimeError(
            f"ingestion stopped: shards {report['shard_errors']}, "
            f"Kafka producer {report['producer_error']}"
        )
    return report


# A feed silent at start-up may be catching its breath (seen once in a user run, while a
# new worker started eight flow runs at once on 2 cores): a Failed ingestion run is not
# started again, so a live run asks this often before it fails. A bad symbol or a
# missing topic fails at once, as before.
FIRST_MESSAGE_TRIES = 3


def _validate(
    p: Plan, settings: config.Settings, topics: Topics, timeout_s: float, logger: Any
) -> dict[str, Any]:
    """Run the checks and log them; the caller decides what a failed check means."""
    report = validate_ingestion(p, settings, topics, timeout_s)
    for c in report["checks"]:
        logger.info("validate %-22s %s  %s", c["check"], "ok  " if c["ok"] else "FAIL", c["detail"])
    return report


def stall_timeout(p: Plan, requested_s: float, logger: Any) -> float:
    """The watchdog's timeout: as asked, but never shorter than the venue's keep-alive
    (a closed stock market is quiet, not dead: Finnhub pings about once a minute)."""
    timeout = venues.stall_timeout(p.venue, requested_s)
    if timeout != requested_s:
        logger.info(
            "stall_timeout_s %.0f s is shorter than %s's keep-alive: using %.0f s",
            requested_s, p.venue, timeout,
        )  # fmt: skip
    return timeout


def _owner(run_id: str) -> str:
    """How the lease names its holder in logs and in ``ingest_leases.owner``."""
    return f"flow run {flow_run.name or '-'} ({run_id}) on {socket.gethostname()} pid {os.getpid()}"


def _serve_metrics(port: int, host: str, logger: Any) -> None:
    """Serve this process's metrics on ``host:port`` (port 0: none). A port already taken
    (another ingestion run on this host) costs this run its endpoint, not its data."""
    if not port or port in _serving:
        return
    try:
        metrics.serve(port, host)
    except OSError as e:
        logger.error("metrics port %d unavailable (%s): this run serves no metrics", port, e)
        return
    _serving.add(port)


def _watch(
    ingestion: Ingestion | Supervisor,
    run_seconds: float | None,
    every_s: float,
    logger: Any,
    ended: threading.Event,
    terminated: threading.Event,
) -> None:
    """Log progress until the deadline, a shard dies, or the server ended this run (a
    false silent-run verdict after an outage: stopping releases the run's lease to the
    replacement waiting for it, which repairs the seconds between). SIGTERM and
    cancellation arrive here as exceptions (Prefect raises TerminationSignal), which run
    the caller's finally; ``terminated`` raises it here when Python swallowed it."""
    start = time.monotonic()
    next_line, next_gauges = start + every_s, start
    while ingestion.alive:
        stop_if_terminated(terminated)
        now = time.monotonic()
        if run_seconds is not None and now - start >= run_seconds:
            return
        if ended.is_set():
            logger.warning("this run was ended by the server: stopping, the lease goes on")
            return
        if now >= next_gauges:
            ingestion.update_gauges()
            next_gauges += 1.0
        if now >= next_line:
            logger.info(ingestion.progress())
            next_line += every_s
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="python -m flows.ingest", description=__doc__.split("\n")[0])
    a.add_argument("--venue", default="binance", help=", ".join(venues.VENUES))
    a.add_argument(
        "--symbols", default=",".join(DEFAULT_SYMBOLS), help="canonical, comma separated"
    )
    a.add_argument(
        "--channels", default="", help=f"{','.join(CHANNELS)},books (default: trades,quotes)"
    )
    a.add_argument("--shard-size", type=int)
    a.add_argument("--validate", choices=["off", "on_start", "only"], default="on_start")
    a.add_argument(
        "--simulator",
        nargs="?",
        const="",
        metavar="URL",
        help="use the local simulator (default TAPELINE_SIMULATOR_URL)",
    )
    a.add_argument("--metrics-port", type=int, help="0: no endpoint")
    a.add_argument("--stall-timeout", type=float, default=30.0)
    a.add_argument(
        "--seconds", type=float, help="stop after this long (default: run until stopped)"
    )
    a.add_argument("--trades-topic", default=TRADES)
    a.add_argument("--quotes-topic", default=QUOTES)
    a.add_argument("--books-topic", default=BOOKS)
    a.add_argument("--book-depth", type=int, default=10, help="levels a side published")
    a.add_argument("--book-snapshot", type=float, default=10.0, help="seconds between snapshots")
    a.add_argument("--max-in-flight", type=int, default=10_000)
    a.add_argument("--progress-every", type=float, default=10.0)
    a.add_argument(
        "--processes", type=int, default=1, help="child processes for the shards (default 1)"
    )
    args = a.parse_args(argv)
    simulator = args.simulator
    if simulator == "":
        simulator = config.load().simulator_url
    result = ingest(
        venue=args.venue,
        symbols=[s for s in args.symbols.split(",") if s],
        channels=[c for c in args.channels.split(",") if c] or None,
        shard_size=args.shard_size,
        validate_mode=args.validate,
        simulator_url=simulator,
        metrics_port=args.metrics_port,
        stall_timeout_s=args.stall_timeout,
        run_seconds=args.seconds,
        trades_topic=args.trades_topic,
        quotes_topic=args.quotes_topic,
        books_topic=args.books_topic,
        book_depth=args.book_depth,
        book_snapshot_s=args.book_snapshot,
        max_in_flight=args.max_in_flight,
        progress_every_s=args.progress_every,
        processes=args.processes,
    )
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
