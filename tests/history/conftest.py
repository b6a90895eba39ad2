"""Each history test module gets its own migrated PostgreSQL schema, and each test a
connection to it."""

from __future__ import annotations

import pytest

from tasks.core.pg import connect
from tests.analytics.support import private_schema


@pytest.fixture(scope="module")
def schema(postgres):
    with private_schema(postgres.pg_dsn) as name:
        yield name


@pytest.fixture
def conn(postgres, schema):
    c = connect(postgres.pg_dsn, schema)
    yield c
    c.close()
