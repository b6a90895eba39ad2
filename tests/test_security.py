"""Security of the local stack, against the real services: the Prefect API refuses
callers without credentials, listeners are on loopback, secrets stay out of reprs, URLs
and logs, and flows refuse bad parameters before any side effect."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from blocks.__main__ import documents
from blocks.connections import MongoConnection, PostgresConnection
from deployments import security
from tasks.core import config
from tasks.core.topics import USER_TRANSACTIONS

ROOT = Path(__file__).resolve().parents[1]
RESERVED = "p@ss:w/rd%20#?x"  # every character that means something in a URL


def test_the_prefect_api_refuses_callers_without_credentials(prefect_server, settings):
    rows = list(security.authentication(settings))
    failed = [f"{r.check}: {r.detail}" for r in rows if not r.ok]
    assert not failed, failed
    assert len(rows) == 6


def test_the_stack_services_listen_on_loopback_only(
    kafka, postgres, mongo, prefect_server, settings
):
    found = security.listeners(settings.home)
    roles = {role for _, _, role, _ in found}
    assert {"kafka", "postgres", "prefect"} <= roles, found
    exposed = [(addr, port, role) for addr, port, role, _ in found if not security._loopback(addr)]
    assert not exposed, exposed


def test_the_exporter_binds_loopback_by_default(kafka, postgres, prefect_server):
    """No --host: the exporter serves on TAPELINE_LISTEN_HOST (loopback by default)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.telemetry.exporter", "--port", "19987", "--interval", "60"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        bound: list[str] = []
        while time.monotonic() < deadline and not bound:
            sockets = security._listening()
            inodes = security.socket_inodes(proc.pid)
            bound = [a for i, (a, port) in sockets.items() if i in inodes and port == 19987]
            time.sleep(0.5)
        assert bound, "waited 60 s for the exporter to listen on :19987"
        assert all(security._loopback(a) for a in bound), bound
    finally:
        proc.terminate()
        proc.wait(30)


def test_settings_never_show_a_password():
    s = config.load(
        {
            "TAPELINE_PG_DSN": f"postgresql://app:{quote(RESERVED, safe='')}@db:5432/x",
            "TAPELINE_MONGO_URL": "mongodb://app:mongo-secret-1@m:27017/",
            "TAPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "TAPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "TAPELINE_KAFKA_PASSWORD": "kafka-secret-1",
            "PREFECT_API_AUTH_STRING": "admin:prefect-secret-1",
        }
    )
    shown = repr(s) + str(s) + repr(s.kafka)
    for secret in (quote(RESERVED, safe=""), RESERVED, "mongo-secret-1", "kafka-secret-1",
                   "prefect-secret-1"):  # fmt: skip
        assert secret not in shown
    assert "***" in shown


def test_passwords_with_reserved_characters_survive_the_blocks():
    """``python -m blocks register`` builds blocks from the settings' URLs, and the blocks
    build URLs again: the password must come back unchanged (it used to be encoded twice)."""
    pg_url = f"postgresql://app%40x:{quote(RESERVED, safe='')}@db:5432/x"
    mongo_url = f"mongodb://app:{quote(RESERVED, safe='')}@m:27017/?authSource=admin"
    s = config.load({"TAPELINE_PG_DSN": pg_url, "TAPELINE_MONGO_URL": mongo_url})
    docs = documents(s)
    pg = next(d for d in docs if isinstance(d, PostgresConnection))
    mongo = next(d for d in docs if isinstance(d, MongoConnection))
    assert pg.password.get_secret_value() == RESERVED and pg.user == "app@x"
    assert mongo.password.get_secret_value() == RESERVED
    again = config.load(pg.env() | mongo.env())
    assert security.secrets_in_effect(again)["PostgreSQL password"] == RESERVED
    assert security.secrets_in_effect(again)["MongoDB password"] == RESERVED


def test_a_postgres_password_with_reserved_characters_connects(postgres, settings):
    """End to end: a role whose password holds @ : / % # ? logs in through the DSN the
    blocks build."""
    import psycopg2

    role = f"tapeline_test_{int(time.time() * 1000) % 10**9}"
    admin = psycopg2.connect(settings.pg_dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (RESERVED,))
        block = PostgresConnection(
            host="127.0.0.1", port=15432, database="tapeline", user=role, password=RESERVED
        )
        dsn = config.load(block.env()).pg_dsn
        with psycopg2.connect(dsn, connect_timeout=10) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone() == (role,)
        conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def test_every_flow_refuses_each_class_of_bad_parameter():
    rows = list(security.parameter_rows())
    failed = [f"{r.check}: {r.detail}" for r in rows if not r.ok]
    assert not failed, failed
    assert len(rows) >= 20


def test_a_refused_replay_leaves_no_trace(kafka, postgres, prefect_server, pg_conn):
    """Run as Prefect runs it: the flow run fails with the one-line reason, and no replay
    consumer was seeded (the check comes before any side effect)."""
    from flows.backfill import replay_topic

    state = replay_topic(
        USER_TRANSACTIONS, datetime.now(UTC) - timedelta(hours=1), return_state=True
    )
    assert state.is_failed()  # once: the flow's retries (2) are not spent on a refusal
    assert "parameter topic='user.transactions'" in state.message, state.message
    assert [s.name for s in _states(state)] == ["Failed"] or "Retrying" not in str(_states(state))
    with pg_conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM kafka_offsets WHERE consumer LIKE %s", ("%user.transactions%",)
        )
        assert cur.fetchone() == (0,)


def _states(state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run_states(state.state_details.flow_run_id)


def test_each_postgres_role_does_only_its_part(postgres, settings):
    """Flows write as the writer, which cannot change the schema; the exporter and reports
    read as the reader, which cannot write; only the owner migrates."""
    from tasks.drain.migrate import migrate

    migrate(settings.pg_dsn, "public")  # grants the roles their part in the schema
    assert settings.pg_writer_dsn != settings.pg_dsn, "the local stack's roles expected"
    rows = list(security.privilege_rows(settings))
    failed = [f"{r.check}: {r.detail}" for r in rows if r.ok is False]
    assert not failed, failed
    assert len(rows) == 3 + len(security.ALLOWED) + len(security.REFUSED)


def test_the_local_stack_secrets_hold_every_reserved_character(tmp_path):
    """Every password the local stack makes (owner, writer, reader, Prefect) is random and
    holds @ : / % # ?, so each run of the stack proves such passwords work end to end; a
    data folder made before the owner's password was random keeps its old one."""
    s = config.load({"TAPELINE_HOME": str(tmp_path)})
    found = security.secrets_in_effect(s)
    assert set(found) == {
        "Prefect API password",
        "PostgreSQL password",
        "PostgreSQL writer password",
        "PostgreSQL reader password",
    }
    assert len(set(found.values())) == 4, "one password per purpose"
    for kind, value in found.items():
        assert set(config.RESERVED) <= set(value), kind
        assert not security._weak(kind, value, s), kind
        assert value not in repr(s), kind
    assert security.secrets_in_effect(config.load({"TAPELINE_HOME": str(tmp_path)})) == found
    legacy = tmp_path / "old"
    (legacy / "postgres" / "data").mkdir(parents=True)
    (legacy / "postgres" / "data" / "PG_VERSION").write_text("16\n")
    old = config.load({"TAPELINE_HOME": str(legacy)})
    assert old.pg_dsn == "postgresql://tapeline:tapeline@127.0.0.1:15432/tapeline"
    assert security._weak("PostgreSQL password", "tapeline", old), "the sweep calls it weak"


def test_processes_beside_the_stack_get_no_owner_password(settings):
    """The worker (and so every flow run it starts) works as the writer, the exporter as
    the reader: neither is given the owner's password."""
    from deployments import local

    assert settings.pg_writer_dsn != settings.pg_dsn, "the local stack's roles expected"
    password = security.secrets_in_effect(settings)["PostgreSQL password"]
    sides = {side.name: side for side in local.sides(settings, ["BTC-USDT"], simulate=True)}
    assert sides["worker"].env["TAPELINE_PG_DSN"] == settings.pg_writer_dsn
    assert sides["exporter"].env["TAPELINE_PG_DSN"] == settings.pg_reader_dsn
    for side in sides.values():
        assert password not in security.pg_passwords(side.env), side.name
    # what a process started with each environment resolves to: its role, never the owner
    home = {"TAPELINE_HOME": str(settings.home)}
    worker = config.load({**sides["worker"].env, **home})
    assert worker.pg_dsn == worker.pg_writer_dsn == settings.pg_writer_dsn
    assert worker.pg_reader_dsn == settings.pg_reader_dsn
    assert config.load({**sides["exporter"].env, **home}).pg_dsn == settings.pg_reader_dsn


def test_a_run_holding_only_the_writer_checks_the_schema_and_never_migrates(postgres, settings):
    """A flow run on the worker holds the writer alone: on a migrated schema its schema
    step only reads; on a schema that lacks migrations it fails at once with the command
    that fixes it (as the owner), and changes nothing."""
    import psycopg2
    import pytest

    from flows.common import migrate_schema
    from tasks.drain.migrate import MigrationError, migrate

    writer_only = settings.with_overrides(pg_dsn=settings.pg_writer_dsn)
    schema = f"sec_{int(time.time() * 1000) % 10**9}"
    owner = psycopg2.connect(settings.pg_dsn)
    owner.autocommit = True
    try:
        with pytest.raises(MigrationError, match=rf"--schema {schema}`"):
            migrate_schema.fn(writer_only, schema)
        with owner.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
            assert cur.fetchone() is None, "the refused step created the schema"
        assert migrate(settings.pg_dsn, schema), "the owner applies every migration"
        assert migrate_schema.fn(writer_only, schema) == []
    finally:
        with owner.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        owner.close()


def test_a_live_run_after_a_simulator_run_stores_every_live_trade(kafka, postgres, new_topic):
    """A feed pointed at the simulator names its data ``binance-sim`` (what ingestion
    stamps: ``venue_config``); the live venue's trades with the same ids, drained after
    the simulated ones, are all stored, none taken for a duplicate."""
    import contextlib
    import uuid

    from tasks.core.pg import connect
    from tasks.venues import venue_config
    from tests.drain.support import drain_prices_now, pg_schema, publish, trades

    assert venue_config("binance", "http://127.0.0.1:18765").name == "binance-sim"
    assert venue_config("binance").name == "binance"
    topic, quotes = new_topic(3), new_topic(1)
    simulated, live = trades(300, venue="binance-sim"), trades(300, venue="binance")
    assert [t.trade_id for t in simulated] == [t.trade_id for t in live]  # the same ids
    with pg_schema(postgres.pg_dsn) as schema:
        consumer = f"test-sim-then-live-{uuid.uuid4().hex[:8]}"
        publish(kafka, topic, simulated)
        drain_prices_now(kafka, schema, consumer, [topic, quotes])
        publish(kafka, topic, live)
        drain_prices_now(kafka, schema, consumer, [topic, quotes])
        with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
            cur.execute("SELECT venue, count(*) FROM trades GROUP BY venue ORDER BY venue")
            assert cur.fetchall() == [("binance", 300), ("binance-sim", 300)]
