"""The topics of the platform and their idempotent provisioning.

Run ``python -m tasks.core.topics`` (the compose ``kafka-init`` service does) to create what
is missing; existing topics are reported, never altered, so a re-run is harmless.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from tasks.core import config
from tasks.core.kafka import admin

TRADES = "market.trades.raw"
QUOTES = "market.book_ticker.raw"
BOOKS = "market.books.raw"
USER_TRANSACTIONS = "user.transactions"
CANDLES = "market.candles.1m"
ALERTS = "market.alerts"
DLQ = "tapeline.dlq"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str  # what the message key is, for the reader of this table
    retention_hours: int | None = None  # None: the configured default
    compact: bool = False


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(TRADES, "symbol"),
    TopicSpec(QUOTES, "symbol", retention_hours=24),
    TopicSpec(BOOKS, "symbol", retention_hours=24),
    TopicSpec(USER_TRANSACTIONS, "user_id", retention_hours=24 * 30),
    TopicSpec(CANDLES, "symbol"),
    TopicSpec(ALERTS, "symbol"),
    TopicSpec(DLQ, "source", retention_hours=24 * 30),
)


def topic_configs(spec: TopicSpec, s: config.TopicSettings) -> dict[str, str]:
    """The broker-side settings of one topic: the admin client here and the Kubernetes
    ``KafkaTopic`` resources (``deployments/kubernetes``) both take them from this."""
    hours = spec.retention_hours if spec.retention_hours is not None else s.retention_hours
    return {
        "retention.ms": str(-1 if hours < 0 else hours * 3_600_000),
        "cleanup.policy": "compact" if spec.compact else "delete",
        "min.insync.replicas": str(min(2, s.replication)),
    }


def _new_topic(spec: TopicSpec, s: config.TopicSettings) -> NewTopic:
    return NewTopic(spec.name, s.partitions, s.replication, topic_configs=topic_configs(spec, s))


def ensure_topics(
    settings: config.Settings | None = None, specs: tuple[TopicSpec, ...] = TOPICS
) -> dict[str, str]:
    """Create missing topics; returns ``{topic: 'created' | 'exists'}``."""
    settings = settings or config.load()
    client = admin(settings)
    try:
        existing = set(client.list_topics())
        report: dict[str, str] = {}
        for spec in specs:
            if spec.name in existing:
                report[spec.name] = "exists"
                continue
            try:
                client.create_topics([_new_topic(spec, settings.topics)])
                report[spec.name] = "created"
            except TopicAlreadyExistsError:  # a concurrent provisioner won the race
                report[spec.name] = "exists"
        return report
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load()
    for name, state in ensure_topics(settings).items():
        print(f"{state:8} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
