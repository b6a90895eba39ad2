"""Versioned PostgreSQL migrations, applied idempotently.

``python -m tasks.drain.migrate [--schema NAME]`` (run as the owner: the main command does
at start, compose's ``migrate`` service before the worker) applies the
``migrations/NNNN_*.sql`` files not yet recorded in ``schema_migrations``, in order, in one
transaction under an advisory lock, so concurrent runs neither race nor half-apply. An
applied file whose text changed is an error: history is fixed, add a new version instead.
Flow runs only check (``pending``) and apply what is missing when their settings hold the
owner; a worker that holds only the writer's credentials fails such a run with one line.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from psycopg2 import sql

from tasks.core import config
from tasks.core.pg import connect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


class MigrationError(RuntimeError):
    """The migration files or the recorded history are inconsistent."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available(folder: Path = MIGRATIONS) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.fullmatch(path.name)
        if m is None:
            raise MigrationError(f"{path.name}: expected NNNN_lowercase_name.sql")
        found.append(Migration(int(m.group(1)), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {folder}")
    return found


def pending(dsn: str, schema: str = "public", folder: Path = MIGRATIONS) -> list[str]:
    """The migrations not yet applied to ``schema``, read without taking any lock or
    creating anything: any role that may read ``schema_migrations`` can ask (the writer
    does, before each run, so that only the owner ever needs DDL rights)."""
    wanted = available(folder)
    conn = connect(dsn, schema)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not cur.fetchone()[0]:
                return [m.name for m in wanted]
            cur.execute("SELECT version, checksum FROM schema_migrations")
            done = dict(cur.fetchall())
    finally:
        conn.close()
    for m in wanted:
        if m.version in done and done[m.version] != m.checksum:
            raise MigrationError(f"{m.name} changed after it was applied to schema {schema!r}")
    return [m.name for m in wanted if m.version not in done]


def migrate(dsn: str, schema: str = "public", folder: Path = MIGRATIONS) -> list[str]:
    """Apply pending migrations to ``schema``; returns the names applied (maybe none)."""
    pending = available(folder)
    conn = connect(dsn, schema, create_schema=True)
    try:
        with conn, conn.cursor() as cur:
            # Per-schema lock: a second migrator waits here, then finds nothing to do.
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tapeline.migrate.' || %s))", (schema,)
            )
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT version, name, checksum FROM schema_migrations")
            done = {v: (name, checksum) for v, name, checksum in cur.fetchall()}
            applied = []
            for m in pending:
                if m.version in done:
                    if done[m.version][1] != m.checksum:
                        raise MigrationError(
                            f"{m.name} changed after it was applied to schema {schema!r}"
                        )
                    continue
                cur.execute(m.sql)
                cur.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
                applied.append(m.name)
            grant(cur, schema, force=bool(applied))
            return applied
    finally:
        conn.close()


# Roles that work in every migrated schema, with what they may do there (the local stack
# makes the first two, compose the writer and Grafana's reader; absent ones are skipped).
GRANTEES: dict[str, str] = {
    config.WRITER_ROLE: "SELECT, INSERT, UPDATE, DELETE",
    config.READER_ROLE: "SELECT",
    "grafana_reader": "SELECT",
}


def grant(cur, schema: str, force: bool = False) -> list[str]:
    """Give each existing grantee role USAGE on ``schema`` and its rights on the tables
    there (and the writer the sequences), when it lacks them or ``force`` (tables were
    just created). The owner keeps DDL to itself. Returns the roles granted to."""
    # Every migrated schema has schema_migrations: a role that may read it has been
    # granted here before (USAGE alone says nothing: PUBLIC has it on ``public``).
    cur.execute(
        "SELECT rolname, has_schema_privilege(rolname, %s, 'USAGE')"
        " AND has_table_privilege(rolname, format('%%I.schema_migrations', %s::text), 'SELECT')"
        " FROM pg_roles WHERE rolname = ANY(%s)",
        (schema, schema, list(GRANTEES)),
    )
    done = []
    for role, granted in cur.fetchall():
        if granted and not force:
            continue
        who = sql.Identifier(role)
        where = sql.Identifier(schema)
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(where, who))
        cur.execute(
            sql.SQL("GRANT " + GRANTEES[role] + " ON ALL TABLES IN SCHEMA {} TO {}").format(
                where, who
            )
        )
        if role == config.WRITER_ROLE:
            cur.execute(
                sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
                    where, who
                )
            )
        done.append(role)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.drain.migrate", description=__doc__)
    ap.add_argument("--schema", default="public")
    args = ap.parse_args(argv)
    applied = migrate(config.load().pg_dsn, args.schema)
    for name in applied:
        print(f"applied  {name}")
    print(f"schema {args.schema!r} is up to date ({len(applied)} applied now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
