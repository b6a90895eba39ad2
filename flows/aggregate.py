"""Candles, indicators and alerts from stored trades, book minutes from stored order-book
snapshots, on event time.

``aggregate`` (scheduled every minute, one run at a time) — runbook of one run:

1. Claim: move the windows that trade inserts marked dirty since the last run (live
   trades, late ones, gap repairs, backfills, replays; see ``tasks.analytics.candle_store``) into
   pending windows for each interval.
2. Recompute every pending window that is final (closed ``grace_s`` ago): candles from
   the trades, indicators forward from the earliest change, new or changed 1 m candles
   published to ``market.candles.1m``. Windows not final yet stay pending.
3. Alerts: evaluate every enabled rule on the candles since its last run, publish what
   fired to ``market.alerts``.
4. Book minutes: recompute every final minute that stored snapshots touched (spread, mid,
   depth and imbalance within each band; ``tasks.analytics.books``).
5. A table artifact of what changed.

``rebuild_candles`` (ad hoc): recompute a venue's symbols over any time range from the
trades stored, e.g. after a backfill or a replay, or to apply new indicator parameters.

Also a command: ``python -m flows.aggregate [rebuild --venue binance --symbols ... --start
... --end ...]``.
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
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import Target, checked, iso, target, to_us
from tasks.analytics import alerts
from tasks.analytics import books as book_minutes
from tasks.analytics import candle_store as store
from tasks.analytics import candles as cdl
from tasks.analytics import indicators as ind
from tasks.analytics.aggregate import PUBLISHED_INTERVAL, Outcome, rebuild, recompute_windows
from tasks.core import params
from tasks.core.codec import MAX_CHARS
from tasks.core.topics import ALERTS, BOOKS, CANDLES, DLQ, QUOTES, TRADES, USER_TRANSACTIONS

DEFAULT_INTERVALS = list(cdl.DEFAULT_INTERVALS)


@task(name="claim-dirty-windows", cache_policy=NO_CACHE)
def claim_windows(t: Target, intervals: list[str]) -> int:
    with closing(t.connect()) as conn:
        claimed = total = store.claim_dirty(conn, intervals)
        while claimed == store.CLAIM_BATCH:  # a backlog (e.g. a large backfill): claim it all
            claimed = store.claim_dirty(conn, intervals)
            total += claimed
    return total


@task(name="recompute-windows", cache_policy=NO_CACHE, task_run_name="recompute {interval}")
def recompute_interval(
    t: Target,
    interval: str,
    grace_s: float,
    spec: ind.Spec,
    candles_topic: str,
) -> list[dict[str, Any]]:
    """Every final pending window of ``interval``, one transaction per series."""
    logger = get_run_logger()
    width = cdl.interval_us(interval)
    now_us = time.time_ns() // 1000
    last_final = cdl.last_final_open(now_us, width, int(grace_s * 1_000_000))
    rows = []
    with closing(t.connect()) as conn:
        pending = store.final_pending(conn, interval, last_final)
        if not pending:
            return rows
        prod = t.producer() if interval == PUBLISHED_INTERVAL else None
        try:
            for (venue, symbol), opens in pending.items():
                key = store.SeriesKey(venue, symbol, interval)
                out = recompute_windows(conn, key, opens, spec, prod, candles_topic)
                rows.append(_row(key, out, opens))
                logger.info(
                    "%s %s %s: %d windows, %d candles changed, %d deleted, %d indicator rows, "
                    "%d published",
                    venue,
                    symbol,
                    interval,
                    out.windows,
                    len(out.changed),
                    out.deleted,
                    out.indicators,
                    out.published,
                )
        finally:
            if prod is not None:
                prod.close(timeout=10)
    return rows


def _row(key: store.SeriesKey, out: Outcome, opens: list[int]) -> dict[str, Any]:
    return {
        "venue": key.venue,
        "symbol": key.symbol,
        "interval": key.interval,
        "from": iso(min(opens)) if opens else "",
        "to": iso(max(opens) + key.width_us) if opens else "",
        "windows": out.windows,
        "changed": len(out.changed),
        "deleted": out.deleted,
        "indicator_rows": out.indicators,
        "published": out.published,
    }


@task(name="evaluate-alerts", cache_policy=NO_CACHE)
def evaluate_alerts(t: Target, alerts_topic: str) -> dict[str, int]:
    """Every enabled rule on its new candles, then publish what fired (and anything an
    earlier run left unpublished)."""
    logger = get_run_logger()
    fired = 0
    with closing(t.connect()) as conn:
        rules = alerts.load_rules(conn)
        for rule in rules:
            for a in alerts.check_rule(conn, rule):
                fired += 1
                logger.info(
                    "alert %s: %s %s close %s", a.alert_id, rule.kind, rule.symbol, a.candle.close
                )
        prod = t.producer()
        try:
            published = alerts.publish_pending(conn, prod, alerts_topic)
        finally:
            prod.close(timeout=10)
    return {"rules": len(rules), "fired": fired, "published": published}


@task(name="book-minutes", cache_policy=NO_CACHE)
def aggregate_book_minutes(t: Target, grace_s: float, bands_bps: list[int]) -> dict[str, int]:
    """Every final minute that stored book snapshots touched, recomputed into book_minutes."""
    with closing(t.connect()) as conn:
        now_us = time.time_ns() // 1000
        return book_minutes.aggregate_final(conn, now_us, int(grace_s * 1_000_000), bands_bps)


# Topics aggregation publishes to: never an input topic, users' transactions or the DLQ.
NOT_OUTPUTS = frozenset({TRADES, QUOTES, BOOKS, USER_TRANSACTIONS, DLQ})


def _check(
    intervals: list[str] | None,
    grace_s: float,
    schema: str,
    candles_topic: str,
    sma: int,
    ewma_span: int,
    change: int,
    rolling: int,
    alerts_topic: str = ALERTS,
    book_bands_bps: list[int] | None = None,
    **_: Any,
) -> None:
    """What aggregate and rebuild-candles take (checked by Prefect's validation)."""
    chosen = list(intervals or DEFAULT_INTERVALS)
    if not chosen or len(chosen) > 16:
        raise params.ParameterError(f"parameter intervals={intervals!r}: expected 1-16 intervals")
    for i in chosen:
        try:
            cdl.interval_us(i)
        except (TypeError, ValueError) as e:
            raise params.ParameterError(f"parameter intervals: {i!r}: {e}") from None
    params.number("grace_s", grace_s, 0, 86_400)
    params.schema(schema)
    params.topic("candles_topic", candles_topic, NOT_OUTPUTS)
    params.topic("alerts_topic", alerts_topic, NOT_OUTPUTS)
    for name, value in (("sma", sma), ("ewma_span", ewma_span), ("change", change)):
        params.number(name, value, 1, 100_000)
    params.number("rolling", rolling, 1, 100_000)
    if book_bands_bps is not None:
        try:
            book_minutes.bands(book_bands_bps)
        except ValueError as e:
            raise params.ParameterError(f"parameter book_bands_bps: {e}") from None


def _check_rebuild(
    venue: str, symbols: list[str], start: datetime, end: datetime, **rest: Any
) -> None:
    _check(**rest)
    params.symbols(symbols)
    if not isinstance(venue, str) or not 0 < len(venue) <= MAX_CHARS["venue"]:
        raise params.ParameterError(f"parameter venue={venue!r}: expected a stored venue name")
    params.time_range(to_us(start), to_us(end), time.time_ns() // 1000)


@checked(_check)
@flow(name="aggregate")
def aggregate(
    intervals: list[str] | None = None,
    grace_s: float = 120.0,
    sma: int = 20,
    ewma_span: int = 20,
    change: int = 60,
    rolling: int = 60,
    evaluate_alert_rules: bool = True,
    book_bands_bps: list[int] | None = None,
    candles_topic: str = CANDLES,
    alerts_topic: str = ALERTS,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Recompute every window touched by trades stored since the last run once it is
    final, store candles and indicators, publish changed 1 m candles, evaluate alerts;
    recompute the book minutes touched by stored snapshots once final.

    Args:
        intervals: Candle intervals, whole minutes/hours/days (default 1m, 5m, 1h).
        grace_s: A window is final this long after it closes; later trades recompute it.
        sma: Simple moving average length, in windows.
        ewma_span: EWMA span in windows (alpha = 2 / (span + 1)), seeded with the first close.
        change: Percent change over this many windows.
        rolling: Rolling min/max/volume over this many windows.
        evaluate_alert_rules: Evaluate the rules in alert_rules after the candles.
        book_bands_bps: Bands around the mid for book depth and imbalance, in basis
            points (default 10 and 50).
        candles_topic: Where changed 1 m candles are published.
        alerts_topic: Where fired alerts are published.
        kafka_block: Name of a Tapeline Kafka block (default: environment settings).
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    intervals = intervals or DEFAULT_INTERVALS
    spec = ind.Spec(sma, ewma_span, change, rolling)
    t = target(kafka_block, postgres_block, schema)
    claimed = claim_windows(t, intervals)
    rows: list[dict[str, Any]] = []
    for interval in intervals:
        rows += recompute_interval(t, interval, grace_s, spec, candles_topic)
    fired = evaluate_alerts(t, alerts_topic) if evaluate_alert_rules else {}
    bands = list(book_bands_bps or book_minutes.DEFAULT_BANDS_BPS)
    books = aggregate_book_minutes(t, grace_s, bands)
    summary = {
        "dirty_claimed": claimed,
        "series": len(rows),
        "windows": sum(r["windows"] for r in rows),
        "candles_changed": sum(r["changed"] for r in rows),
        "published": sum(r["published"] for r in rows),
        "alerts": fired,
        "book_minutes": books,
    }
    logger.info("aggregate: %s", json.dumps(summary))
    create_table_artifact(
        key="aggregate-last-run",
        table=rows or [{"note": "no final windows were pending"}],
        description=f"aggregate: {json.dumps(summary)}",
    )
    return summary | {"by_series": rows}


@task(name="rebuild-series", cache_policy=NO_CACHE, task_run_name="rebuild {symbol} {interval}")
def rebuild_series(
    t: Target,
    venue: str,
    symbol: str,
    interval: str,
    start_us: int,
    end_us: int,
    spec: ind.Spec,
    candles_topic: str,
) -> dict[str, Any]:
    key = store.SeriesKey(venue, symbol, interval)
    with closing(t.connect()) as conn:
        prod = t.producer() if interval == PUBLISHED_INTERVAL else None
        try:
            out = rebuild(conn, key, start_us, end_us, spec, prod, candles_topic)
        finally:
            if prod is not None:
                prod.close(timeout=10)
    return _row(key, out, [cdl.window_open(start_us, key.width_us), end_us - key.width_us])


@checked(_check_rebuild)
@flow(name="rebuild-candles")
def rebuild_candles(
    venue: str,
    symbols: list[str],
    start: datetime,
    end: datetime,
    intervals: list[str] | None = None,
    grace_s: float = 120.0,
    sma: int = 20,
    ewma_span: int = 20,
    change: int = 60,
    rolling: int = 60,
    candles_topic: str = CANDLES,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Recompute candles and indicators of ``symbols`` for the windows overlapping
    [start, end) from the stored trades: windows without trades lose their candle;
    indicators are recomputed through the range and their EWMA carried on to the
    present. Windows not final yet are left to ``aggregate``. Changed 1 m candles are
    published.

    Args:
        venue: Venue name as stored with the trades, e.g. binance.
        symbols: Canonical symbols, e.g. ["BTC-USDT"].
        start: Range start (UTC if no offset).
        end: Range end, exclusive.
        intervals: Candle intervals (default 1m, 5m, 1h).
        grace_s: Windows closing less than this long ago are left to aggregate.
        sma: Simple moving average length, in windows.
        ewma_span: EWMA span in windows.
        change: Percent change over this many windows.
        rolling: Rolling min/max/volume over this many windows.
        candles_topic: Where changed 1 m candles are published.
        kafka_block: Name of a Tapeline Kafka block (default: environment settings).
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    intervals = intervals or DEFAULT_INTERVALS
    spec = ind.Spec(sma, ewma_span, change, rolling)
    start_us, end_us = to_us(start), to_us(end)
    t = target(kafka_block, postgres_block, schema)
    now_us = time.time_ns() // 1000
    rows = []
    for interval in intervals:
        width = cdl.interval_us(interval)
        final_end = cdl.last_final_open(now_us, width, int(grace_s * 1_000_000)) + width
        stop = min(end_us, final_end)
        if stop <= start_us:
            logger.info("%s: nothing final in the range yet", interval)
            continue
        for symbol in symbols:
            row = rebuild_series(t, venue, symbol, interval, start_us, stop, spec, candles_topic)
            logger.info("rebuilt %s", json.dumps(row))
            rows.append(row)
    create_table_artifact(
        key="rebuild-candles-last-run",
        table=rows or [{"note": "nothing final in the range"}],
        description=f"rebuild_candles {venue} {','.join(symbols)} {start} .. {end}",
    )
    return {"by_series": rows, "candles_changed": sum(r["changed"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.aggregate", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("rebuild", help="rebuild_candles for a range")
    r.add_argument("--venue", required=True)
    r.add_argument("--symbols", required=True, help="comma separated")
    r.add_argument("--start", required=True, help="ISO time, UTC if no offset")
    r.add_argument("--end", required=True)
    r.add_argument("--intervals", default=",".join(DEFAULT_INTERVALS))
    p.add_argument("--grace", type=float, default=120.0)
    p.add_argument("--schema", default="public")
    a = p.parse_args(argv)
    if a.command == "rebuild":
        result = rebuild_candles(
            venue=a.venue,
            symbols=a.symbols.split(","),
            start=datetime.fromisoformat(a.start),
            end=datetime.fromisoformat(a.end),
            intervals=a.intervals.split(","),
            grace_s=a.grace,
            schema=a.schema,
        )
    else:
        result = aggregate(grace_s=a.grace, schema=a.schema)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
