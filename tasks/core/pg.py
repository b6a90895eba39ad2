"""PostgreSQL connections: the one way any stage opens one.

``connect`` pins ``search_path`` to a schema (tests and side-by-side environments use
their own) and turns on TCP keepalives, so a dead server is noticed in seconds rather than
at the kernel's two-hour default.
"""

from __future__ import annotations

import re

import psycopg2

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def connect(dsn: str, schema: str = "public", *, create_schema: bool = False):
    """A connection whose unqualified names resolve in ``schema`` (tests use their own)."""
    if _SCHEMA.fullmatch(schema) is None:
        raise ValueError(f"schema {schema!r}: expected a lowercase SQL identifier")
    conn = psycopg2.connect(
        dsn,
        options=f"-c search_path={schema}",
        connect_timeout=5,
        application_name="tapeline",
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    if create_schema:
        with conn, conn.cursor() as cur:  # IF NOT EXISTS alone races with itself
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tapeline.schema.' || %s))", (schema,)
            )
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    return conn


def table_checksum(conn, table: str, order_by: str) -> tuple[int, str]:
    """(row count, md5 of every row in key order): equal tables give equal checksums."""
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY {order_by})), '')"
            f" FROM {table} t"
        )
        count, digest = cur.fetchone()
    conn.rollback()
    return count, digest
