"""Session fixtures that hand tests real services from the local stack.

Each service fixture starts (or reuses) that service with ``stack``. With ``CI=true`` a
service that cannot start fails the test; on a laptop it skips, saying why.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tasks.core import config

SETTINGS = config.load()
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Point Prefect at the local stack's server before anything imports prefect, and keep
# its results out of the user's home so cached results never leak between sessions.
for _name, _value in SETTINGS.prefect_env().items():  # URL and the server's credentials
    os.environ.setdefault(_name, _value)
os.environ.setdefault("PREFECT_HOME", str(SETTINGS.home / "prefect-client"))
_results = tempfile.mkdtemp(prefix="tapeline-results-")
atexit.register(shutil.rmtree, _results, ignore_errors=True)
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", _results)
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

_started: dict[str, str] = {}
# A test that asks for any of these (directly or through another fixture) needs the stack.
SERVICE_FIXTURES = frozenset({"settings", "kafka", "postgres", "mongo", "prefect_server"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs the stack ``services``: scripts/test.sh runs the rest
    (CPU-bound: properties, parsers, manifests) beside them, in a second process."""
    for item in items:
        if item.get_closest_marker("beside"):
            continue  # its own topics, schemas, databases or brokers: safe beside the rest
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


def _need(name: str) -> None:
    """Start (or reuse) one stack service, once per session."""
    if name in _started:
        if _started[name] != "ok":
            _unavailable(name, _started[name])
        return
    from stack.process import StackError
    from stack.services import services, up

    try:
        up(services(SETTINGS, (name,)))
        _started[name] = "ok"
    except (StackError, OSError) as e:
        _started[name] = str(e)
        _unavailable(name, str(e))


def _unavailable(name: str, why: str) -> None:
    msg = f"{name} is not available: {why}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def settings() -> config.Settings:
    return SETTINGS


@pytest.fixture(scope="session")
def kafka(settings) -> config.Settings:
    _need("kafka")
    return settings


@pytest.fixture(scope="session")
def postgres(settings) -> config.Settings:
    """PostgreSQL with the ``public`` schema migrated, as ``deployments.setup`` leaves it
    (flow runs hold only the writer: they check the schema, the owner migrates)."""
    _need("postgres")
    if "public-schema" not in _started:
        from tasks.drain.migrate import migrate

        migrate(settings.pg_dsn, "public")
        _started["public-schema"] = "ok"
    return settings


@pytest.fixture(scope="session")
def mongo(settings) -> config.Settings:
    _need("mongo")
    return settings


@pytest.fixture(scope="session")
def prefect_server(settings) -> str:
    _need("prefect")
    return settings.prefect_api_url


@pytest.fixture
def new_topic(kafka):
    """Factory of fresh, uniquely named topics (deleted after the test)."""
    from kafka.admin import NewTopic

    from tasks.core.kafka import admin

    client = admin(kafka)
    made: list[str] = []

    def make(partitions: int = 3, prefix: str = "test") -> str:
        name = f"{prefix}.{uuid.uuid4().hex[:10]}"
        client.create_topics([NewTopic(name, partitions, 1)])
        client.wait_for_topics([name])
        made.append(name)
        return name

    yield make
    if made:
        with contextlib.suppress(Exception):  # best effort: names are unique anyway
            client.delete_topics(made)
    client.close()


@pytest.fixture
def pg_conn(postgres) -> Iterator:
    import psycopg2

    conn = psycopg2.connect(postgres.pg_dsn)
    yield conn
    conn.close()


@pytest.fixture
def mongo_db(mongo) -> Iterator:
    """A fresh database per test, dropped afterwards."""
    import pymongo

    client = pymongo.MongoClient(mongo.mongo_url, serverSelectionTimeoutMS=5000)
    name = f"test_{uuid.uuid4().hex[:10]}"
    yield client[name]
    client.drop_database(name)
    client.close()
