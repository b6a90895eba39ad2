"""Prefect blocks for Tapeline, and how flows turn block names into settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from blocks.connections import (
    BLOCKS,
    KafkaCluster,
    MongoConnection,
    PostgresConnection,
    VenueFeed,
)
from tasks import venues
from tasks.core import config

__all__ = [
    "BLOCKS",
    "KafkaCluster",
    "MongoConnection",
    "PostgresConnection",
    "VenueFeed",
    "prefect_api",
    "settings",
    "venue_credential",
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


def venue_credential(venue: str, simulator_url: str | None = None) -> str:
    """The API token ``venue`` needs (``VenueSpec.credential``): from the environment
    (``TAPELINE_FINNHUB_TOKEN``), else from the Prefect Secret block of that name. Empty
    for a venue that needs none and for the simulator (which has its own: a real token
    never leaves for it). ValueError, naming both places and never a value, when
    neither holds one."""
    spec = venues.spec(venue)
    if not spec.credential or simulator_url:
        return ""
    token = config.venue_secret(spec.credential)
    if token:
        return token
    from prefect.blocks.system import Secret

    try:
        token = Secret.load(spec.credential).get()
    except ValueError:  # no such block document
        token = ""
    if not isinstance(token, str) or not token.strip():
        raise ValueError(
            f"{venue} needs an API token: set {config.secret_var(spec.credential)} or save"
            f" a Prefect Secret block named {spec.credential!r}"
        )
    return token.strip()


@contextmanager
def prefect_api(s: config.Settings) -> Iterator[None]:
    """This process, and every Prefect process it starts, talks to ``s``'s Prefect server
    with its credentials (Prefect reads its settings when imported, hence both the
    environment for children and temporary settings for this process)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    os.environ.update(s.prefect_env())
    with temporary_settings(
        {PREFECT_API_URL: s.prefect_api_url, PREFECT_API_AUTH_STRING: s.prefect_auth or None}
    ):
        yield
