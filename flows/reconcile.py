"""Reconcile: are the stored trades the venue's trades? Run daily by the
``reconcile/<venue>-daily`` deployments (yesterday, UTC) and ad hoc from the UI or
``prefect deployment run 'reconcile/adhoc'`` for any range.

Runbook:

1. Cut [start, end) into UTC hours (by default yesterday's 24); refuse a range that ends
   less than ``settle_s`` ago, where the drain may still be storing trades.
2. Per symbol, hour by hour: the venue's REST history of the hour against the trades
   stored for it (count, id range, traded volume; ``tasks.history.reconcile``). Trades
   the venue lists and the table lacks are published to Kafka like backfilled ones
   (``refill=False`` only reports them); stored trades the venue does not list are
   reported as extra, never deleted. Each hour is recorded in ``reconcile_hours``.
3. Wait (up to ``wait_for_drain_s``) until the drain has stored the refilled trades and
   record how many it did; candles of those windows are recomputed by ``aggregate`` as
   with any late trade.
4. Leave a report artifact (per symbol, and every hour that differed) and return the
   totals. The exporter turns ``reconcile_hours`` into ``tapeline_reconcile_*`` gauges;
   the alert ``TapelineVenueIncomplete`` fires when a venue's newest checked day had
   under 99.99% of its trades stored when checked.

A rerun of the same range checks again and finds nothing once the refill is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks import venue_credential
from flows.common import Target, checked, iso, target, to_us
from tasks import venues
from tasks.core import config, params
from tasks.core.kafka import producer as kafka_producer
from tasks.core.topics import TRADES
from tasks.history import reconcile as rc
from tasks.ingest.publish import PRODUCER_TUNING, Publisher, Topics
from tasks.venues.http import HOUR_US

MAX_DAYS = 31  # one run's range; a longer history is reconciled in several runs


def default_range(now: datetime | None = None) -> tuple[datetime, datetime]:
    """Yesterday, UTC: what the daily deployments check."""
    today = (now or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1), today


def _bounds(start: datetime | None, end: datetime | None) -> tuple[int, int]:
    if start is None and end is None:
        start, end = default_range()
    elif start is None or end is None:
        raise params.ParameterError("parameters start and end: give both, or neither (yesterday)")
    return to_us(start), to_us(end)


def _check(
    venue: str,
    symbols: list[str],
    start: datetime | None,
    end: datetime | None,
    settle_s: float,
    wait_for_drain_s: float,
    trades_topic: str,
    schema: str,
    **_: Any,
) -> None:
    params.venue(venue, venues.VENUES)
    if not venues.spec(venue).trade_history:
        raise params.ParameterError(
            f"parameter venue={venue!r}: serves no trade history over REST to reconcile with"
        )
    params.symbols(symbols)
    params.schema(schema)
    params.topic("trades_topic", trades_topic, params.NOT_PRICES)
    params.number("settle_s", settle_s, 0, 86_400)
    params.number("wait_for_drain_s", wait_for_drain_s, 0, 86_400)
    now_us = time.time_ns() // 1000
    start_us, end_us = params.time_range(*_bounds(start, end), now_us)
    if end_us > now_us - int(settle_s * 1_000_000):
        raise params.ParameterError(
            f"parameter end={iso(end_us)}: must be at least settle_s={settle_s:g} s ago;"
            " trades of a later time may still be on their way to the table"
        )
    if end_us - start_us > MAX_DAYS * rc.DAY_US:
        raise params.ParameterError(
            f"parameter end={iso(end_us)}: at most {MAX_DAYS} days per run; split the range"
        )


@task(name="reconcile-hours", cache_policy=NO_CACHE, task_run_name="reconcile {symbol}")
def reconcile_symbol(
    t: Target,
    client: Any,
    publisher: Publisher | None,
    venue: str,
    symbol: str,
    hours: list[int],
) -> list[rc.HourCheck]:
    """Check every hour of ``symbol``, refill what is missing (when a publisher is given)
    and record each hour once its refill is acknowledged by Kafka."""
    logger = get_run_logger()
    lane = publisher.lane(f"reconcile-{symbol}") if publisher else None
    checks = []
    with closing(t.connect()) as conn:
        for hour in hours:
            listed = client.trades_by_time(symbol, hour, hour + HOUR_US)
            c, missing = rc.check_hour(conn, listed, venue, symbol, hour)
            if c.missing or c.extra:
                logger.warning(
                    "%s %s %s: venue %d trades, stored %d, missing %d, extra %d",
                    venue, symbol, iso(hour), c.venue_trades, c.stored_trades,
                    c.missing, len(c.extra),
                )  # fmt: skip
            if lane and missing:
                rc.refill(lane, c, missing)
            rc.record(conn, [c])
            checks.append(c)
    return checks


@task(name="wait-for-refill", cache_policy=NO_CACHE)
def wait_for_refill(t: Target, checks: list[rc.HourCheck], timeout_s: float) -> bool:
    """Poll until the drain has stored every refilled trade (or ``timeout_s``), then
    record how many it had: True when all were."""
    deadline = time.monotonic() + timeout_s
    todo = [c for c in checks if c.missing]
    with closing(t.connect()) as conn:
        while True:
            rc.count_refilled(conn, todo)
            done = all(c.refilled >= c.missing for c in todo)
            if done or time.monotonic() >= deadline:
                rc.record(conn, todo)
                if not done:
                    get_run_logger().warning(
                        "the drain stored %d of %d refilled trades within %.0f s; the rest"
                        " are in Kafka and land with the drain (a rerun checks them)",
                        sum(c.refilled for c in todo), sum(c.missing for c in todo), timeout_s,
                    )  # fmt: skip
                return done
            time.sleep(1.0)


def _report(venue: str, start_us: int, end_us: int, checks: list[rc.HourCheck]) -> dict[str, Any]:
    """Totals per symbol and overall, as a markdown artifact plus a table of the hours
    that differed; returns the overall totals."""
    per_symbol: dict[str, dict[str, Any]] = {}
    for c in checks:
        s = per_symbol.setdefault(
            c.symbol, {"hours": 0, "venue_trades": 0, "missing": 0, "extra": 0, "refilled": 0}
        )
        s["hours"] += 1
        s["venue_trades"] += c.venue_trades
        s["missing"] += c.missing
        s["extra"] += len(c.extra)
        s["refilled"] += c.refilled
    total = {
        k: sum(s[k] for s in per_symbol.values())
        for k in ("venue_trades", "missing", "extra", "refilled")
    }
    listed = total["venue_trades"]
    total["completeness"] = 1.0 if not listed else (listed - total["missing"]) / listed
    lines = [
        f"# Reconcile {venue}, {iso(start_us)} .. {iso(end_us)}",
        "",
        f"Completeness when checked: **{100 * total['completeness']:.4f}%**"
        f" ({total['missing']} of {listed} trades missing, {total['refilled']} refilled;"
        f" {total['extra']} stored trades the venue does not list).",
        "",
        "| symbol | hours | venue trades | missing | refilled | extra |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {sym} | {s['hours']} | {s['venue_trades']} | {s['missing']} | {s['refilled']}"
            f" | {s['extra']} |"
            for sym, s in per_symbol.items()
        ),
    ]
    create_markdown_artifact("\n".join(lines), key=f"reconcile-{venue}", description="reconcile")
    differed = [c.row() | {"hour": iso(c.hour_us)} for c in checks if c.missing or c.extra]
    create_table_artifact(
        table=differed or [{"note": "every hour matched"}],
        key=f"reconcile-{venue}-hours",
        description=f"reconcile {venue}: hours that differed",
    )
    return {"symbols": per_symbol, **total}


@checked(_check)
@flow(name="reconcile", retries=1, retry_delay_seconds=300)
def reconcile(
    venue: str,
    symbols: list[str],
    start: datetime | None = None,
    end: datetime | None = None,
    refill: bool = True,
    simulator_url: str | None = None,
    min_request_interval_s: float | None = None,
    settle_s: float = 600.0,
    wait_for_drain_s: float = 600.0,
    trades_topic: str = TRADES,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
    schema: str = "public",
) -> dict[str, Any]:
    """Compare the stored trades of ``symbols`` with the venue's REST history hour by
    hour over [start, end) (default: yesterday, UTC), refill what is missing through
    Kafka, and report.

    Args:
        venue: binance, binanceus, coinbase, kraken or deribit (finnhub lists no trades).
        symbols: Canonical symbols, e.g. ["BTC-USDT"].
        start: Range start (UTC if no offset); the hour holding it is checked whole.
        end: Range end, exclusive; at least ``settle_s`` ago.
        refill: Publish missing trades to ``trades_topic`` (False: report only).
        simulator_url: Compare with the local exchange simulator (venue ``<venue>-sim``).
        min_request_interval_s: Pace REST requests more gently than the client default.
        settle_s: How long ago ``end`` must be, so the drain has stored the range.
        wait_for_drain_s: How long to wait for the drain to store the refilled trades.
        trades_topic: Where refilled trades are published.
        kafka_block: Name of a Tapeline Kafka block (default: environment settings).
        postgres_block: Name of a Tapeline PostgreSQL block (default: environment settings).
        schema: PostgreSQL schema holding the tables (migrated on start).
    """
    logger = get_run_logger()
    start_us, end_us = _bounds(start, end)
    t = target(kafka_block, postgres_block, schema)
    cfg = venues.venue_config(venue, simulator_url, venue_credential(venue, simulator_url))
    client = venues.trades_client(venue, cfg, min_request_interval_s)
    hour_list = rc.hours(start_us, end_us)
    logger.info(
        "reconcile %s %s: %d hours from %s", cfg.name, ",".join(symbols), len(hour_list),
        iso(hour_list[0]),
    )  # fmt: skip
    publisher = None
    if refill:
        publisher = Publisher(
            kafka_producer(t.settings, **PRODUCER_TUNING), cfg.name, Topics(trades=trades_topic)
        )
    checks: list[rc.HourCheck] = []
    try:
        for symbol in symbols:
            checks += reconcile_symbol(t, client, publisher, cfg.name, symbol, hour_list)
    finally:
        if publisher is not None and publisher.close():
            logger.error("refilled trades unresolved at close; a rerun publishes them again")
    if refill and any(c.missing for c in checks):
        wait_for_refill(t, checks, wait_for_drain_s)
    summary = {"venue": cfg.name, "start": iso(start_us), "end": iso(hour_list[-1] + HOUR_US)}
    summary |= _report(cfg.name, start_us, end_us, checks)
    logger.info(
        "reconcile %s: completeness %.4f%%, missing %d, refilled %d, extra %d",
        cfg.name, 100 * summary["completeness"], summary["missing"], summary["refilled"],
        summary["extra"],
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.reconcile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--venue", required=True)
    p.add_argument("--symbols", required=True, help="canonical, comma separated")
    p.add_argument("--start", help="ISO time, UTC if no offset (default: yesterday)")
    p.add_argument("--end")
    p.add_argument("--report-only", action="store_true", help="do not refill")
    p.add_argument("--simulator", nargs="?", const="", metavar="URL")
    p.add_argument("--settle", type=float, default=600.0)
    p.add_argument("--wait-for-drain", type=float, default=600.0)
    p.add_argument("--schema", default="public")
    a = p.parse_args(argv)
    result = reconcile(
        a.venue,
        a.symbols.split(","),
        start=datetime.fromisoformat(a.start) if a.start else None,
        end=datetime.fromisoformat(a.end) if a.end else None,
        refill=not a.report_only,
        simulator_url=config.load().simulator_url if a.simulator == "" else a.simulator,
        settle_s=a.settle,
        wait_for_drain_s=a.wait_for_drain,
        schema=a.schema,
    )
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
