"""Drains: Kafka into PostgreSQL price history and MongoDB wallets, once in effect.

``drain_prices`` (continuous: each scheduled run follows the topics until the next one takes over)
— runbook of one run:

1. Apply pending PostgreSQL migrations.
2. Drain ``market.trades.raw``, ``market.book_ticker.raw`` and ``market.books.raw``
   (snapshots stored, deltas counted as skipped) in batches until caught
   up (following: until the next run takes over) or a record/time budget is spent
   (``tasks.drain.loop``; the exactly-once mechanism
   is written down in ``tasks/drain/contract.py`` and ``tasks/drain/postgres.py``). Bad
   records go to the DLQ.
3. Record the drain metrics (pushed to the Pushgateway when one is configured), publish
   a table artifact, return the summary.

``drain_transactions`` does the same for ``user.transactions`` into MongoDB
``transactions`` and ``wallets`` (mechanism in ``tasks/drain/mongo.py``).

A crashed or retried run is harmless: the next one resumes from the offsets the
database stored with the data. Runs given disjoint ``partitions`` drain in parallel; two
runs on the same partitions stay exactly once (the stale writer is fenced or guarded).
A new sink is one module in ``tasks/drain`` and one flow here that calls ``run_drain``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from blocks import settings as block_settings
from flows.common import RETRIES, checked, migrate_schema
from tasks.core import config, params
from tasks.core.topics import BOOKS, QUOTES, TRADES, USER_TRANSACTIONS
from tasks.drain.contract import Sink
from tasks.drain.loop import DrainResult, OffsetOutOfLog, drain, record_metrics
from tasks.drain.mongo import MongoSink
from tasks.drain.postgres import PostgresSink
from tasks.telemetry.observe import push_drain_metrics


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A drain that failed on its offsets or its parameters fails the same way again: only
    other failures (a database or broker restarting) go on to the retry policy."""
    return not isinstance(state.data, OffsetOutOfLog | ValueError)


@task(
    name="drain-topics",
    cache_policy=NO_CACHE,
    task_run_name="drain {consumer}",
    retry_condition_fn=worth_retrying,
    **RETRIES,
)
def drain_topics(
    sink: Sink,
    settings: config.Settings,
    consumer: str,
    topics: list[str],
    dlq_source: str,
    options: dict[str, Any],
) -> DrainResult:
    return drain(sink, consumer, topics, dlq_source=dlq_source, settings=settings, **options)


def run_drain(
    flow_name: str,
    sink: Sink,
    settings: config.Settings,
    consumer: str,
    topics: list[str],
    options: dict[str, Any],
) -> Completed:
    """The steps every drain flow shares once its sink is open: drain, metrics, summary.
    ``options``: the flow's drain parameters (``tasks.drain.loop.drain`` keywords)."""
    result = drain_topics(sink, settings, consumer, topics, flow_name.replace("-", "."), options)
    record_metrics(flow_name, result)
    # Flow runs are short-lived processes: hand the counts to the Pushgateway (when one
    # is configured) so Prometheus sees them after the run has ended.
    push_drain_metrics(flow_name, url=settings.pushgateway_url)
    summary = summarize(flow_name, result)
    publish(summary)
    return Completed(message=state_message(summary), data=summary)


def state_message(summary: dict[str, Any]) -> str:
    """What the run's final state says: how it ended, and anything an operator must know
    (records left behind, dead-lettered, skipped) even though the run completed."""
    parts = [f"{summary['stopped']}: {sum(summary['rows'].values())} rows"]
    left = sum(summary["lag"].values())
    if left:
        parts.append(f"{left} records left for the next run")
    if summary["rejects"]:
        parts.append(f"{sum(summary['rejects'].values())} records dead-lettered")
    if summary["skipped_deleted_records"]:
        skipped = sum(summary["skipped_deleted_records"].values())
        parts.append(f"{skipped} records deleted by Kafka before they were stored, skipped")
    return "; ".join(parts)


def summarize(flow_name: str, result: DrainResult) -> dict[str, Any]:
    """The run's summary: what was read, written, skipped, rejected and left behind."""
    return {
        "flow": flow_name,
        "consumer": result.consumer,
        "stopped": result.stopped,
        "seconds": round(result.seconds, 3),
        "batches": len(result.batch_seconds),
        "records": dict(result.records),
        "rows": dict(result.written.rows),
        "duplicates": dict(result.written.duplicates),
        "skipped": dict(result.written.skipped),
        "rejects": dict(result.rejects),
        "lag": result.lag_by_topic(),
        "fenced": result.fenced,
        "first_write_s": None if result.first_write_s is None else round(result.first_write_s, 3),
        "longest_wait_s": round(result.longest_wait_s, 3),
        "partitions": result.partitions,
        "skipped_deleted_records": {f"{t}[{p}]": n for (t, p), n in result.gaps.items()},
    }


def publish(summary: dict[str, Any]) -> None:
    """Log the summary and keep it as a table artifact: one row per topic and table."""
    get_run_logger().info("drain summary: %s", summary)
    rows = [
        {
            "kind": "topic",
            "name": topic,
            "records": summary["records"].get(topic, 0),
            "rejects": summary["rejects"].get(topic, 0),
            "lag_left": lag,
            "rows_written": "",
            "duplicates_skipped": "",
        }
        for topic, lag in summary["lag"].items()
    ] + [
        {
            "kind": "table",
            "name": table,
            "records": "",
            "rejects": "",
            "lag_left": "",
            "rows_written": n,
            "duplicates_skipped": summary["duplicates"].get(table, 0),
        }
        for table, n in summary["rows"].items()
    ]
    parts = "; ".join(f"{t} {_ranges(ps)}" for t, ps in summary["partitions"].items())
    create_table_artifact(
        rows,
        key=summary["flow"],
        description=(
            f"{summary['flow']}: {summary['stopped']} after {summary['seconds']} s,"
            f" {summary['batches']} batches (first after {summary['first_write_s']} s, longest"
            f" wait {summary['longest_wait_s']} s), consumer {summary['consumer']},"
            f" partitions {parts}"
        ),
    )


def _ranges(partitions: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for p in partitions:
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


def _check_prices(
    trades_topic: str, quotes_topic: str, books_topic: str, schema: str, **rest: Any
) -> None:
    _check(**rest)
    params.topic("trades_topic", trades_topic, params.NOT_PRICES)
    params.topic("quotes_topic", quotes_topic, params.NOT_PRICES)
    params.topic("books_topic", books_topic, params.NOT_PRICES)
    params.schema(schema)


def _check_transactions(topic: str, database: str | None, **rest: Any) -> None:
    _check(**rest)
    params.topic("topic", topic, params.NOT_TRANSACTIONS)
    if database is not None and not params.IDENT_MONGO.fullmatch(str(database)):
        raise params.ParameterError(f"parameter database={database!r}: expected [A-Za-z0-9_-]")


@checked(_check_prices)
@flow(name="drain-prices", log_prints=True, retries=1, retry_delay_seconds=30)
def drain_prices(
    trades_topic: str = TRADES,
    quotes_topic: str = QUOTES,
    books_topic: str = BOOKS,
    consumer: str = "tapeline-drain-prices",
    schema: str = "public",
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 20_000,
    partitions: str | None = None,
    allow_gaps: bool = False,
    reset_log: bool = False,
    follow: bool = False,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
) -> dict[str, Any]:
    """Trades, top-of-book quotes and order-book snapshots from Kafka into PostgreSQL,
    exactly once in effect (book deltas are read and counted, not stored).

    ``partitions`` ("0-2,5"; default all) splits the work between deployments;
    ``allow_gaps`` skips (and counts) records deleted from Kafka before they were stored
    instead of failing; ``reset_log`` accepts a recreated topic, starting it over;
    ``follow`` (the schedule's) keeps reading after catching up until ``max_seconds`` or
    until the next scheduled run takes over, so the topics are read while it starts."""
    settings = block_settings(kafka=kafka_block, postgres=postgres_block)
    migrate_schema(settings, schema)
    sink = PostgresSink(settings.pg_writer_dsn, schema)
    topics = [trades_topic, quotes_topic, books_topic]
    return run_drain("drain-prices", sink, settings, consumer, topics, _options(locals()))


@checked(_check_transactions)
@flow(name="drain-transactions", log_prints=True, retries=1, retry_delay_seconds=30)
def drain_transactions(
    topic: str = USER_TRANSACTIONS,
    consumer: str = "tapeline-drain-transactions",
    database: str | None = None,
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 5_000,
    partitions: str | None = None,
    allow_gaps: bool = False,
    reset_log: bool = False,
    follow: bool = False,
    kafka_block: str | None = None,
    mongo_block: str | None = None,
) -> dict[str, Any]:
    """User transactions from Kafka into MongoDB transactions and wallet balances
    (parameters as ``drain_prices``)."""
    settings = block_settings(kafka=kafka_block, mongo=mongo_block)
    sink = MongoSink(settings.mongo_url, database or settings.mongo_db)
    return run_drain("drain-transactions", sink, settings, consumer, [topic], _options(locals()))


def _check(
    consumer: str, max_records: int | None, max_seconds: float, batch_size: int, **_: Any
) -> None:
    """The drain parameters both flows share."""
    params.consumer(consumer)
    if max_records is not None:
        params.number("max_records", max_records, 1, 10**12)
    params.number("max_seconds", max_seconds, 1, 86_400)
    params.number("batch_size", batch_size, 1, 200_000)
    if isinstance(batch_size, float):
        raise params.ParameterError(f"parameter batch_size={batch_size!r}: expected an integer")


_OPTIONS = (
    "max_records", "max_seconds", "batch_size", "partitions", "allow_gaps", "reset_log", "follow",
)  # fmt: skip


def _options(params: dict[str, Any]) -> dict[str, Any]:
    """The drain keywords among a flow's parameters."""
    return {k: params[k] for k in _OPTIONS}
