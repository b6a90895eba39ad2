"""Prefect blocks for Tapeline, and how flows turn block names into settings."""

from __future__ import annotations

import os

from blocks.connections import (
    BLOCKS,
    KafkaCluster,
    MongoConnection,
    PostgresConnection,
    VenueFeed,
)
from tasks.core import config

__all__ = [
    "BLOCKS",
    "KafkaCluster",
    "MongoConnection",
    "PostgresConnection",
    "VenueFeed",
    "settings",
]


def settings(
    kafka: str | None = None, postgres: str | None = None, mongo: str | None = None
) -> config.Settings:
    """Settings from the named blocks, falling back to the environment for the rest."""
    env = dict(os.environ)
    for cls, name in (
        (KafkaCluster, kafka),
        (PostgresConnection, postgres),
        (MongoConnection, mongo),
    ):
        if name:
            env.update(cls.load(name).env())  # type: ignore[attr-defined]
    return config.load(env)
