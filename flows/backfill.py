"""Backfill and replay, run ad hoc from the Prefect UI or ``prefect deployment run``.

``backfill_trades`` — runbook:

1. Plan epoch-aligned pages per symbol over [start, end); skip pages recorded as done
   by an earlier run (``backfill_pages``), so a crashed or cancelled run resumes where
   it stopped without fetching a finished page again (the flow's own retries, after
   e.g. a venue's rate-limit ban outlasting the REST client's backoff, resume the same way).
2. Per symbol, page by page: fetch the venue's REST history (paced and rate-limit aware
   by the REST client), publish the trades to ``market.trades.raw`` like live ones, wait
   for every ack, record the page. Progress (pages, trades, rate, ETA) is logged and
   shown as a progress artifact.
3. Wait until the drain has stored the range's trades in PostgreSQL (up to
   ``wait_for_drain_s``), then rebuild the range's candles (``rebuild_candles``). If the
   drain is slower, the trades still mark their windows dirty when they land, and
   ``aggregate`` recomputes them.

``backfill_candles``: venue klines for ranges where trades are not wanted, stored as
candles with source 'venue' (Binance, Binance US and Finnhub serve klines).

``replay_topic``: re-drain a topic from a point in time into PostgreSQL through the
drain's sink and batch loop (``tasks.history.replay``), to rebuild a table after loss; progress
(records, rate, ETA) from the offsets the sink stores with each batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from blocks import venue_credential
from flows.aggregate import rebuild_candles
from flows.common import Target, checked, iso, target, to_us
from tasks import venues
from tasks.analytics import candle_store as store
from tasks.analytics import candles as cdl
from tasks.analytics import indicators as ind
from tasks.core import config, params
from tasks.core.kafka import producer as kafka_producer
from tasks.core.topics import TRADES
from tasks.drain.loop import drain
from tasks.drain.postgres import PostgresSink
from tasks.history import backfill as bf
from tasks.history import replay
from tasks.ingest.publish import PRODUCER_TUNING, Publisher, Topics


class _Reporter:
    """Progress in the log every ``every_s`` and in a progress artifact."""

    def __init__(self, progress: bf.Progress, logger: Any, every_s: float = 10.0):
        self.progress, self.logger, self.every_s = progress, logger, every_s
        self.artifact = create_progress_artifact(
            progress=100 * progress.fraction, description=progress.line()
        )
        self._next = time.monotonic() + every_s

    def page(self, result: bf.PageResult) -> None:
        self.progress.add(result)
        now = time.monotonic()
        if now >= self._next or self.progress.left == 0:
            self._next = now + self.every_s
            self.logger.info(self.progress.line())
            update_progress_artifact(
                self.artifact, 100 * self.progress.fraction, self.progress.line()
            )


@task(name="backfill-trade-pages", cache_policy=NO_CACHE, task_run_name="backfill {symbol}")
def backfill_symbol(
    t: Target,
    client: Any,
    publisher: Publisher,
    venue: str,
    symbol: str,
    pages: list[bf.Page],
    settle_s: float,
    reporter: _Reporter,
) -> list[dict[str, Any]]:
    lane = publisher.lane(f"backfill-{symbol}")
    rows = []
    with closing(t.connect()) as conn:
        for page in pages:
            r = bf.backfill_trade_page(conn, client, lane, venue, page, settle_s)
            reporter.page(r)
            rows.append(_page_row(r))
    return rows


def _page_row(r: bf.PageResult) -> dict[str, Any]:
    return {
        "symbol": r.page.symbol,
        "start": iso(r.page.start_us),
        "end": iso(r.page.end_us),
        "rows": r.rows,
        "first_id": r.first_id,
        "last_id": r.last_id,
        "recorded": r.recorded,
    }


@task(name="wait-for-drain", cache_policy=NO_CACHE)
def wait_for_drain(
    t: Target,
    venue: str,
    expected: dict[str, int],
    start_us: int,
    end_us: int,
    timeout_s: float,
) -> bool:
    """True once PostgreSQL holds at least ``expected[symbol]`` trades of each symbol in
    [start_us, end_us), i.e. the drain has stored everything published."""
    logger = get_run_logger()
    deadline = time.monotonic() + timeout_s
    with closing(t.connect()) as conn:
        while True:
            with conn, conn.cursor() as cur:
                cur.execute(
                    """SELECT symbol, count(*) FROM trades WHERE venue = %s
                       AND symbol = ANY(%s) AND event_us >= %s AND event_us < %s
                       GROUP BY symbol""",
                    (venue, list(expected), start_us, end_us),
                )
                stored = dict(cur.fetchall())
            short = {s: n - stored.get(s, 0) for s, n in expected.items() if stored.get(s, 0) < n}
            if not short:
                return True
            if time.monotonic() >= deadline:
                logger.warning(
                    "drain has not stored everything after %.0f s (missing per symbol: %s); "
                    "aggregate will recompute these windows when it does",
                    timeout_s,
                    short,
                )
                return False
            time.sleep(1.0)


def _check_range(
    venue: str, symbols: list[str], start: datetime, end: datetime, schema: str, **_: Any
) -> tuple[int, int]:
    """What both backfills take: a known venue, canonical symbols, an ordered range in
    the past, a usable schema."""
    params.venue(venue, venues.VENUES)
    params.symbols(symbols)
    params.schema(schema)
    return params.time_range(to_us(start), to_us(end), time.time_ns() // 1000)


def _check_trades(page_minutes: float, trades_topic: str, **rest: Any) -> None:
    start_us, end_us = _check_range(**rest)
    if not venues.spec(rest["venue"]).trade_history:
        raise params.ParameterError(
            f"parameter venue={rest['venue']!r}: serves no trade history over REST;"
            " use backfill_candles"
        )
    params.number("page_minutes", page_minutes, 1 / 60, 1440)
    params.topic("trades_topic", trades_topic, params.NOT_PRICES)
    page_us = int(page_minutes * 60_000_000)
    per_symbol = -(-(end_us - start_us) // page_us)
    params.pages(len(rest["symbols"]) * per_symbol, per_symbol)


def _check_candles(interval: str, **rest: Any) -> None:
    start_us, end_us = _check_range(**rest)
    try:
        width = cdl.interval_us(interval)
    except ValueError as e:
        raise params.ParameterError(f"parameter interval={interval!r}: {e}") from None
    per_symbol = -(-(end_us - start_us) // (1000 * width))
    params.pages(len(rest["symbols"]) * per_symbol, per_symbol)


def _check_replay(
    topic: str, from_time: datetime, schema: str, max_seconds: float, batch_size: int, **_: Any
) -> None:
    params.topic("topic", topic, params.NOT_PRICES)
    params.schema(schema)
    params.number("max_seconds", max_seconds, 1, 7 * 86_400)
    params.number("batch_size", batch_size, 1, 200_000)
    if to_us(from_time) > time.time_ns() // 1000:
        raise params.ParameterError(f"parameter from_time={from_time}: is in the future")


@checked(_check_trades)
@flow(name="backfill-trades", retries=2, retry_delay_seconds=120)
def backfill_trades(
    venue: str,
    symbols: list[str],
    start: datetime,
    end: datetime,
    page_minutes: float = 5.0,
    simulator_url: str | None = None,
    min_request_interval_s: float | None = None,
    settle_s: float = 10.0,
    trades_topic: str = TRADES,
    wait_for_drain_s: float = 300.0,
    rebuild: bool = True,
    intervals: list[str] | None = None,
    grace_s: float = 120.0,
    progress_every_s: float = 10.0,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Fill [start, end) of ``symbols`` from the venue's REST history through Kafka,
    resumably page by page; then rebuild the range's candles.

    Args:
        venue: binance, binanceus, coinbase, kraken or deribit (finnhub serves no trades).
        symbols: Canonical symbols, e.g. ["BTC-USDT"].
        start: Range start (UTC if no offset).
        end: Range end, exclusive.
        page_minutes: Length of one resumable page of history.
        simulator_url: Fetch from the local exchange simulator at this URL instead.
        min_request_interval_s: Pace REST requests more gently than the client default.
        settle_s: A page is recorded as done only if it ended this long before fetching.
        trades_topic: Where the trades are published.
        wait_for_drain_s: How long to wait for the drain to store them before the rebuild.
        rebuild: Rebuild the range's candles once the trades are stored.
        intervals: Candle intervals to rebuild (default 1m, 5m, 1h).
        grace_s: Windows closing less than this long ago are left to aggregate.
        progress_every_s: Progress line interval in the log.
        kafka_block: Name of a Tapeline Kafka block (default: environment settings).
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    start_us, end_us = to_us(start), to_us(end)
    page_us = int(page_minutes * 60_000_000)
    t = target(kafka_block, postgres_block, schema)
    cfg = venues.venue_config(venue, simulator_url, venue_credential(venue, simulator_url))
    client = venues.trades_client(venue, cfg, min_request_interval_s)
    pages = bf.plan_pages(symbols, start_us, end_us, page_us)
    with closing(t.connect()) as conn:
        done = bf.done_pages(conn, cfg.name, bf.TRADES, pages)
    progress = bf.Progress(len(pages), skipped=len(done))
    logger.info(
        "backfill %s %s %s .. %s: %d pages, %d already done",
        cfg.name,
        ",".join(symbols),
        iso(start_us),
        iso(end_us),
        len(pages),
        len(done),
    )
    reporter = _Reporter(progress, logger, progress_every_s)
    publisher = Publisher(
        kafka_producer(t.settings, **PRODUCER_TUNING), cfg.name, Topics(trades=trades_topic)
    )
    rows: list[dict[str, Any]] = []
    try:
        for symbol in symbols:
            todo = [p for p in pages if p.symbol == symbol and p not in done]
            if todo:
                rows += backfill_symbol(
                    t, client, publisher, cfg.name, symbol, todo, settle_s, reporter
                )
    finally:
        left = publisher.close()
        if left:
            logger.error("%d messages unresolved at close", left)
    logger.info(progress.line())
    summary = {"venue": cfg.name, "symbols": symbols, **progress.summary()}
    create_table_artifact(
        key="backfill-trades-pages",
        table=rows or [{"note": "every page was already done"}],
        description=f"backfill_trades: {json.dumps(summary)}",
    )
    if rebuild:
        with closing(t.connect()) as conn:
            expected = _expected_rows(conn, cfg.name, bf.TRADES, pages)
        if wait_for_drain(t, cfg.name, expected, start_us, end_us, wait_for_drain_s):
            summary["rebuild"] = rebuild_candles(
                cfg.name,
                symbols,
                start,
                end,
                intervals or list(cdl.DEFAULT_INTERVALS),
                grace_s,
                kafka_block=kafka_block,
                postgres_block=postgres_block,
                schema=schema,
            )["candles_changed"]
    return summary


def _expected_rows(conn, venue: str, kind: str, pages: list[bf.Page]) -> dict[str, int]:
    """Trades per symbol in the recorded pages (pages reaching into the present are not
    recorded; their trades are not waited for)."""
    expected = dict.fromkeys(sorted({p.symbol for p in pages}), 0)
    with conn, conn.cursor() as cur:
        for p in pages:
            cur.execute(
                """SELECT rows FROM backfill_pages WHERE venue = %s AND symbol = %s
                   AND kind = %s AND start_us = %s AND end_us = %s""",
                (venue, p.symbol, kind, p.start_us, p.end_us),
            )
            row = cur.fetchone()
            expected[p.symbol] += row[0] if row else 0
    return expected


@task(name="backfill-kline-pages", cache_policy=NO_CACHE, task_run_name="klines {symbol}")
def backfill_kline_symbol(
    t: Target,
    client: Any,
    venue: str,
    symbol: str,
    interval: str,
    pages: list[bf.Page],
    settle_s: float,
    reporter: _Reporter,
    spec: ind.Spec,
) -> list[dict[str, Any]]:
    rows = []
    with closing(t.connect()) as conn:
        for page in pages:
            r = bf.backfill_kline_page(conn, client, venue, interval, page, settle_s)
            reporter.page(r)
            rows.append(_page_row(r) | {"changed": r.changed})
        if pages:
            key = store.SeriesKey(venue, symbol, interval)
            with conn, conn.cursor() as cur:
                store.lock_series(conn, key)
                store.recompute_indicators(cur, key, pages[0].start_us, spec)
    return rows


@checked(_check_candles)
@flow(name="backfill-candles", retries=2, retry_delay_seconds=120)
def backfill_candles(
    venue: str,
    symbols: list[str],
    start: datetime,
    end: datetime,
    interval: str = "1m",
    simulator_url: str | None = None,
    min_request_interval_s: float | None = None,
    settle_s: float = 10.0,
    progress_every_s: float = 10.0,
    sma: int = 20,
    ewma_span: int = 20,
    change: int = 60,
    rolling: int = 60,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Venue klines of ``symbols`` for [start, end) into ``candles`` with source 'venue',
    with their indicators; resumable page by page like ``backfill_trades``.

    Args:
        venue: A venue with kline history (``VenueSpec.klines``: binance, binanceus,
            finnhub).
        symbols: Canonical symbols, e.g. ["BTC-USDT"].
        start: Range start (UTC if no offset).
        end: Range end, exclusive.
        interval: Kline interval, e.g. 1m, 5m, 1h.
        simulator_url: Fetch from the local exchange simulator at this URL instead.
        min_request_interval_s: Pace REST requests more gently than the client default.
        settle_s: A page is recorded as done only if it ended this long before fetching.
        progress_every_s: Progress line interval in the log.
        sma: Simple moving average length, in windows.
        ewma_span: EWMA span in windows.
        change: Percent change over this many windows.
        rolling: Rolling min/max/volume over this many windows.
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    start_us, end_us = to_us(start), to_us(end)
    width = cdl.interval_us(interval)
    cfg = venues.venue_config(venue, simulator_url, venue_credential(venue, simulator_url))
    client = venues.klines_client(venue, cfg, min_request_interval_s)
    t = target(None, postgres_block, schema)
    pages = bf.plan_pages(symbols, cdl.window_open(start_us, width), end_us, 1000 * width)
    kind = f"klines:{interval}"
    with closing(t.connect()) as conn:
        done = bf.done_pages(conn, cfg.name, kind, pages)
    progress = bf.Progress(len(pages), skipped=len(done))
    reporter = _Reporter(progress, logger, progress_every_s)
    spec = ind.Spec(sma, ewma_span, change, rolling)
    rows: list[dict[str, Any]] = []
    for symbol in symbols:
        todo = [p for p in pages if p.symbol == symbol and p not in done]
        if todo:
            rows += backfill_kline_symbol(
                t, client, cfg.name, symbol, interval, todo, settle_s, reporter, spec
            )
    logger.info(progress.line())
    summary = {
        "venue": cfg.name,
        "interval": interval,
        **progress.summary(),
        "candles_changed": sum(r["changed"] for r in rows),
    }
    create_table_artifact(
        key="backfill-candles-pages",
        table=rows or [{"note": "every page was already done"}],
        description=f"backfill_candles: {json.dumps(summary)}",
    )
    return summary


@task(name="replay-drain", cache_policy=NO_CACHE, task_run_name="replay {topic}")
def replay_drain(
    t: Target, name: str, topic: str, max_seconds: float, batch_size: int
) -> dict[str, Any]:
    """The price drain under the replay's consumer name, until caught up or out of time."""
    res = drain(
        PostgresSink(t.settings.pg_writer_dsn, t.schema),
        name,
        [topic],
        dlq_source=f"replay.{topic}",
        settings=t.settings,
        max_seconds=max_seconds,
        batch_size=batch_size,
    )
    return {
        "stopped": res.stopped,
        "records": res.records.get(topic, 0),
        "rows": res.written.rows,
        "duplicates": res.written.duplicates,
        "rejects": res.rejects.get(topic, 0),
        "lag": res.lag_by_topic().get(topic, 0),
        "seconds": round(res.seconds, 3),
    }


@checked(_check_replay)
@flow(name="replay-topic", retries=2, retry_delay_seconds=120)
def replay_topic(
    topic: str,
    from_time: datetime,
    restart: bool = False,
    max_seconds: float = 3600.0,
    batch_size: int = 20_000,
    progress_every_s: float = 10.0,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Re-drain ``topic`` (trades or quotes) from ``from_time`` into PostgreSQL through
    the price drain's sink, to rebuild a table after loss; rows already stored are
    skipped. Replayed trades mark their candle windows, which ``aggregate`` recomputes.

    Args:
        topic: A price topic, e.g. market.trades.raw or market.book_ticker.raw.
        from_time: Replay records Kafka stamped at or after this time (UTC if no offset).
        restart: Start over from from_time even if this replay ran before (by default a
            rerun with the same topic and from_time continues where it stopped).
        max_seconds: Time budget; a replay not finished by then continues on a rerun.
        batch_size: Records per database transaction.
        progress_every_s: Progress line interval in the log.
        kafka_block: Name of a Tapeline Kafka block (default: environment settings).
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    from_us = to_us(from_time)
    t = target(kafka_block, postgres_block, schema)
    s = replay.span(t.settings, topic, from_us)
    name = replay.consumer_name(topic, from_us)
    with closing(t.connect()) as conn:
        fresh = replay.seed(conn, name, s, restart)
        logger.info(
            "replay %s from %s as %s: %d records to the end (%s)",
            topic,
            iso(from_us),
            name,
            s.total,
            "new" if fresh else "continuing",
        )
        artifact = create_progress_artifact(0.0, description=f"replay {topic}")
        started = time.monotonic()
        future = replay_drain.submit(t, name, topic, max_seconds, batch_size)
        while True:
            future.wait(timeout=progress_every_s)
            done = s.done(replay.stored(conn, name, topic))
            elapsed = time.monotonic() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f"{(s.total - done) / rate:.0f} s" if rate > 0 else "?"
            line = f"records {done}/{s.total}, {rate:.0f}/s, ETA {eta}"
            logger.info(line)
            update_progress_artifact(artifact, 100 * done / s.total if s.total else 100.0, line)
            if future.state.is_final():
                break
    result = {"topic": topic, "consumer": name, "to_replay": s.total, **future.result()}
    create_table_artifact(
        key="replay-topic-last-run",
        table=[{k: json.dumps(v) if isinstance(v, dict) else v for k, v in result.items()}],
        description=f"replay_topic {topic} from {iso(from_us)}",
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.backfill", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trades", help="backfill_trades")
    k = sub.add_parser("candles", help="backfill_candles")
    r = sub.add_parser("replay", help="replay_topic")
    r.add_argument("--topic", required=True)
    r.add_argument("--from-time", required=True, help="ISO time, UTC if no offset")
    r.add_argument("--restart", action="store_true")
    r.add_argument("--schema", default="public")
    for s in (t, k):
        s.add_argument("--venue", required=True)
        s.add_argument("--symbols", required=True, help="canonical, comma separated")
        s.add_argument("--start", required=True, help="ISO time, UTC if no offset")
        s.add_argument("--end", required=True)
        s.add_argument("--simulator", nargs="?", const="", metavar="URL")
        s.add_argument("--min-request-interval", type=float)
        s.add_argument("--settle", type=float, default=10.0)
        s.add_argument("--schema", default="public")
    t.add_argument("--page-minutes", type=float, default=5.0)
    t.add_argument("--trades-topic", default=TRADES)
    t.add_argument("--wait-for-drain", type=float, default=300.0)
    t.add_argument("--no-rebuild", action="store_true")
    k.add_argument("--interval", default="1m")
    a = p.parse_args(argv)
    if a.command == "replay":
        result = replay_topic(
            a.topic, datetime.fromisoformat(a.from_time), restart=a.restart, schema=a.schema
        )
        print(json.dumps(result, default=str), flush=True)
        return 0
    simulator = config.load().simulator_url if a.simulator == "" else a.simulator
    common = {
        "venue": a.venue,
        "symbols": a.symbols.split(","),
        "start": datetime.fromisoformat(a.start),
        "end": datetime.fromisoformat(a.end),
        "simulator_url": simulator,
        "min_request_interval_s": a.min_request_interval,
        "settle_s": a.settle,
        "schema": a.schema,
    }
    if a.command == "trades":
        result = backfill_trades(
            **common,
            page_minutes=a.page_minutes,
            trades_topic=a.trades_topic,
            wait_for_drain_s=a.wait_for_drain,
            rebuild=not a.no_rebuild,
        )
    else:
        result = backfill_candles(**common, interval=a.interval)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
