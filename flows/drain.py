"""Drains: Kafka into PostgreSQL price history and MongoDB wallets, once in effect.

``drain_prices`` (every minute, one run at a time) — runbook of one run:

1. Apply pending PostgreSQL migrations (``tasks.sinks.migrate``).
2. Drain ``market.trades.raw`` and ``market.book_ticker.raw`` in batches until caught
   up or a record/time budget is spent (``tasks.drain``; the exactly-once mechanism is
   written down in ``tasks/sinks/postgres.py``). Bad records go to the DLQ.
3. Record the drain metrics, publish a table artifact, return the summary.

``drain_transactions`` does the same for ``user.transactions`` into MongoDB
``transactions`` and ``wallets`` (mechanism in ``tasks/sinks/mongo.py``).

A crashed or retried run is harmless: the next one resumes from the offsets the
database stored with the data. Two runs at once split the partitions between them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks import settings as block_settings
from tasks import config
from tasks.drain import DrainResult, Sink, drain, record_metrics
from tasks.sinks.migrate import migrate
from tasks.sinks.mongo import MongoSink
from tasks.sinks.postgres import PostgresSink
from tasks.topics import QUOTES, TRADES, USER_TRANSACTIONS

# A failed drain is safe to run again at once (it resumes from the offsets stored with
# the data), so its task retries with growing, jittered delays (a database restarting,
# a broker electing leaders); the flow retries once more after that. Prefect's flow
# retries take one fixed delay only, hence the backoff sits on the tasks.
RETRIES = {"retries": 3, "retry_delay_seconds": [5, 15, 45], "retry_jitter_factor": 0.5}


@task(name="migrate-price-history", cache_policy=NO_CACHE, **RETRIES)
def migrate_schema(settings: config.Settings, schema: str) -> list[str]:
    applied = migrate(settings.pg_dsn, schema)
    if applied:
        get_run_logger().info("applied migrations: %s", ", ".join(applied))
    return applied


@task(name="drain-topics", cache_policy=NO_CACHE, task_run_name="drain {consumer}", **RETRIES)
def drain_topics(
    sink: Sink,
    settings: config.Settings,
    consumer: str,
    topics: list[str],
    dlq_source: str,
    max_records: int | None,
    max_seconds: float,
    batch_size: int,
) -> DrainResult:
    return drain(
        sink,
        consumer,
        topics,
        dlq_source=dlq_source,
        settings=settings,
        max_records=max_records,
        max_seconds=max_seconds,
        batch_size=batch_size,
    )


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
        "rejects": dict(result.rejects),
        "lag": result.lag_by_topic(),
        "fenced": result.fenced,
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
    create_table_artifact(
        rows,
        key=summary["flow"],
        description=(
            f"{summary['flow']}: {summary['stopped']} after {summary['seconds']} s,"
            f" {summary['batches']} batches, consumer {summary['consumer']}"
        ),
    )


@flow(name="drain-prices", log_prints=True, retries=1, retry_delay_seconds=30)
def drain_prices(
    trades_topic: str = TRADES,
    quotes_topic: str = QUOTES,
    consumer: str = "tapeline-drain-prices",
    schema: str = "public",
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 20_000,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
) -> dict[str, Any]:
    """Trades and top-of-book quotes from Kafka into PostgreSQL, exactly once in effect."""
    settings = block_settings(kafka=kafka_block, postgres=postgres_block)
    migrate_schema(settings, schema)
    result = drain_topics(
        PostgresSink(settings.pg_dsn, schema),
        settings,
        consumer,
        [trades_topic, quotes_topic],
        "drain.prices",
        max_records,
        max_seconds,
        batch_size,
    )
    record_metrics("drain-prices", result)
    summary = summarize("drain-prices", result)
    publish(summary)
    return summary


@flow(name="drain-transactions", log_prints=True, retries=1, retry_delay_seconds=30)
def drain_transactions(
    topic: str = USER_TRANSACTIONS,
    consumer: str = "tapeline-drain-transactions",
    database: str | None = None,
    max_records: int | None = None,
    max_seconds: float = 50.0,
    batch_size: int = 5_000,
    kafka_block: str | None = None,
    mongo_block: str | None = None,
) -> dict[str, Any]:
    """User transactions from Kafka into MongoDB transactions and wallet balances."""
    settings = block_settings(kafka=kafka_block, mongo=mongo_block)
    result = drain_topics(
        MongoSink(settings.mongo_url, database or settings.mongo_db),
        settings,
        consumer,
        [topic],
        "drain.transactions",
        max_records,
        max_seconds,
        batch_size,
    )
    record_metrics("drain-transactions", result)
    summary = summarize("drain-transactions", result)
    publish(summary)
    return summary
