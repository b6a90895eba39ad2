"""A private PostgreSQL schema with every migration applied, for aggregation tests.

Tests of candles, alerts and backfill share PostgreSQL with other tests running at the
same time; their own schema (every flow takes ``schema=``) keeps their tables, triggers
and rows apart.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator

import psycopg2

from tasks.drain import migrate


@contextlib.contextmanager
def private_schema(dsn: str) -> Iterator[str]:
    """A fresh schema with the migrations applied; its name, for ``schema=`` of the
    flows and ``postgres.connect``."""
    schema = f"t6_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    migrate.migrate(dsn, schema)
    try:
        yield schema
    finally:
        with contextlib.closing(psycopg2.connect(dsn)) as admin:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f"DROP SCHEMA {schema} CASCADE")


def insert_trades(conn, rows: list[tuple]) -> None:
    """Write trades as a drain does (COPY into staging, one INSERT ... ON CONFLICT DO
    NOTHING). rows: (venue, symbol, trade_id, price, qty, event_us)."""
    text = "".join(
        f"{v}\t{s}\t{s.replace('-', '')}\t{i}\t{p}\t{q}\tbuy\t{e}\t{e + 1000}\n"
        for v, s, i, p, q, e in rows
    )
    cols = "venue, symbol, venue_symbol, trade_id, price, qty, side, event_us, recv_us"
    with conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS staging_t6 AS SELECT {cols} FROM trades LIMIT 0"
        )
        cur.execute("TRUNCATE staging_t6")
        cur.copy_expert(f"COPY staging_t6 ({cols}) FROM STDIN", io.StringIO(text))
        cur.execute(
            f"INSERT INTO trades ({cols}) SELECT {cols} FROM staging_t6 ON CONFLICT DO NOTHING"
        )
