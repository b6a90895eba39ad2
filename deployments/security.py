"""The security sweep: checks what the local stack exposes, and prints one row per check.

    .venv/bin/python -m deployments.security          # against the running local stack

- authentication: the Prefect API refuses calls without the stack's credentials (and the
  secret-reading block filter among them), refuses state changes without a CSRF token,
  and tells no foreign web origin it may call it;
- listeners: every listening socket of the stack's processes (services, side processes,
  flow-run processes they started) is on a loopback address;
- secrets: no password in effect appears in the stack's log files, in flow-run
  parameters, task-run inputs, artifacts or logs kept by Prefect, or on a metrics page;
- parameters: every flow refuses each class of bad parameter with one line, before it
  opens anything;
- privileges: the PostgreSQL writer role (what flows store rows as) cannot change the
  schema, the reader cannot write, and they are not the owner.

Exit status 0 when every built check passes, 1 otherwise. Nothing here prints a secret:
a finding names the place and the kind of secret, never its value.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from tasks.core import config
from tasks.core.params import ParameterError
from tasks.core.topics import BOOKS, DLQ, TRADES, USER_TRANSACTIONS
from tasks.telemetry.prefect_api import PrefectApi

METRICS_PAGES = ("9108", "9110", "9091")  # ingestion, exporter, Pushgateway on loopback


@dataclass
class Row:
    area: str
    check: str
    ok: bool | None  # None: not built, never counted as passed
    detail: str = ""


# ---- authentication ---------------------------------------------------------------------


def _status(url: str, method: str = "GET", body: bytes | None = None, **headers: str) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def authentication(s: config.Settings) -> Iterator[Row]:
    api = s.prefect_api_url.rstrip("/")
    json_h = {"Content-Type": "application/json"}
    # Reads (no CSRF token involved) show the authentication itself; a state change
    # without credentials may be refused by the CSRF check first (403): refused either way.
    code = _status(f"{api}/admin/version")
    yield Row("auth", "API read without credentials refused", code == 401, f"HTTP {code}")
    body = json.dumps({"include_secrets": True}).encode()
    code = _status(f"{api}/block_documents/filter", "POST", body, **json_h)
    ok = code in (401, 403)
    yield Row("auth", "block secrets without credentials refused", ok, f"HTTP {code}")
    wrong = "Basic " + base64.b64encode(b"tapeline:wrong").decode()
    code = _status(f"{api}/admin/version", Authorization=wrong)
    yield Row("auth", "wrong password refused", code == 401, f"HTTP {code}")
    client = PrefectApi(s.prefect_api_url, s.prefect_auth)
    headers = {k: v for k, v in client.headers().items() if k == "Authorization"}
    code = _status(f"{api}/flows/filter", "POST", b"{}", **headers, **json_h)
    yield Row("auth", "state change without CSRF token refused", code == 403, f"HTTP {code}")
    try:
        client.post("/flows/filter", {"limit": 1})
        yield Row("auth", "the stack's own client is let in", True, "with auth and CSRF")
    except Exception as e:
        yield Row("auth", "the stack's own client is let in", False, type(e).__name__)
    req = urllib.request.Request(
        f"{api}/flows/filter",
        method="OPTIONS",
        headers={
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            allowed = r.headers.get("access-control-allow-origin", "")
    except urllib.error.HTTPError as e:
        allowed = e.headers.get("access-control-allow-origin", "") if e.headers else ""
    ok = allowed not in ("*", "http://evil.example")
    yield Row("auth", "no foreign origin allowed (CORS)", ok, f"allow-origin {allowed or 'absent'}")


# ---- listeners --------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def stack_pids(home: Path) -> dict[int, str]:
    """The stack's and side processes' pids (``home/run/*.pid``) and all below them."""
    kids = _children()
    found: dict[int, str] = {}
    for pidfile in sorted((home / "run").glob("*.pid")):
        try:
            root = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid in found or not Path(f"/proc/{pid}").exists():
                continue
            found[pid] = pidfile.stem
            todo += kids.get(pid, [])
    return found


def _listening() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket."""
    out: dict[int, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds (an fd closed while we look is skipped)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def listeners(home: Path) -> list[tuple[str, int, str, int]]:
    """(address, port, role, pid) of every listening socket the stack's processes hold."""
    sockets = _listening()
    found = [
        (*sockets[inode], role, pid)
        for pid, role in stack_pids(home).items()
        for inode in socket_inodes(pid)
        if inode in sockets
    ]
    return sorted(set(found))


def _loopback(addr: str) -> bool:
    ip = ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listener_rows(s: config.Settings) -> Iterator[Row]:
    found = listeners(s.home)
    if not found:
        yield Row("listeners", "stack processes found", False, f"no pid file under {s.home}/run")
        return
    for addr, port, role, _pid in found:
        ok = _loopback(addr)
        yield Row("listeners", f"{role} :{port}", ok, addr if ok else f"{addr}: NOT loopback")


# ---- secrets ----------------------------------------------------------------------------


def secrets_in_effect(s: config.Settings) -> dict[str, str]:
    """Kind -> value of each password in use that is worth searching for (a password
    shorter than 8 characters, or equal to its user or database name, would match
    everywhere: it is reported as weak instead)."""
    found: dict[str, str] = {}
    if s.prefect_auth:
        found["Prefect API password"] = s.prefect_auth.partition(":")[2]
    pg = urlsplit(s.pg_dsn)
    if pg.password:
        found["PostgreSQL password"] = unquote(pg.password)
    for role, dsn in (("writer", s.pg_writer_dsn), ("reader", s.pg_reader_dsn)):
        password = urlsplit(dsn).password
        if password and dsn != s.pg_dsn:
            found[f"PostgreSQL {role} password"] = unquote(password)
    mongo = urlsplit(s.mongo_url)
    if mongo.password:
        found["MongoDB password"] = unquote(mongo.password)
    if s.kafka.password:
        found["Kafka password"] = s.kafka.password
    return found


def _weak(kind: str, value: str, s: config.Settings) -> bool:
    names = {urlsplit(s.pg_dsn).username, urlsplit(s.pg_dsn).path.lstrip("/"), s.mongo_db}
    return len(value) < 8 or value in names


def _forms(value: str) -> set[str]:
    """How a secret could be written: as is, percent-encoded, JSON-escaped."""
    return {value, quote(value, safe=""), json.dumps(value)[1:-1]}


def _places(s: config.Settings) -> Iterator[tuple[str, Callable[[], str]]]:
    """(name, reader) of every place a secret must not be."""
    for log in sorted((s.home / "logs").glob("*")):
        if log.is_file():
            yield f"log {log.name}", lambda log=log: log.read_text(errors="replace")
    api = PrefectApi(s.prefect_api_url, s.prefect_auth)
    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    runs = {"flow_runs": {"start_time": {"after_": since}}, "limit": 200, "sort": "START_TIME_DESC"}
    yield "flow-run parameters", lambda: json.dumps(api.post("/flow_runs/filter", runs))
    task_runs = {"limit": 200, "sort": "EXPECTED_START_TIME_DESC"}
    yield "task-run inputs", lambda: json.dumps(api.post("/task_runs/filter", task_runs))
    yield "artifacts", lambda: json.dumps(api.post("/artifacts/filter", {"limit": 200}))
    logs = {"limit": 200, "sort": "TIMESTAMP_DESC"}
    yield "Prefect logs", lambda: json.dumps(api.post("/logs/filter", logs))
    yield "deployments", lambda: json.dumps(api.post("/deployments/filter", {"limit": 200}))
    for port in METRICS_PAGES:
        url = f"http://127.0.0.1:{port}/metrics"
        yield f"metrics :{port}", lambda url=url: _read(url)


def _read(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode(errors="replace")
    except OSError:
        return ""  # nothing served: nothing shown


def secret_rows(s: config.Settings) -> Iterator[Row]:
    secrets = secrets_in_effect(s)
    searched = {k: v for k, v in secrets.items() if not _weak(k, v, s)}
    for kind in sorted(set(secrets) - set(searched)):
        yield Row("secrets", f"{kind} is not a default", False, "too short or equal to a name")
    for place, read in _places(s):
        try:
            text = read()
        except Exception as e:
            yield Row("secrets", place, False, f"could not read: {type(e).__name__}")
            continue
        leaks = [k for k, v in searched.items() if any(f in text for f in _forms(v))]
        yield Row("secrets", place, not leaks, f"shows {', '.join(leaks)}" if leaks else "clean")


# ---- parameters -------------------------------------------------------------------------


def bad_parameters() -> list[tuple[str, Any, dict[str, Any]]]:
    """(what, flow, parameters) for each class of bad parameter of each flow."""
    from flows import aggregate, drain, ingest, reconcile, trading
    from flows import backfill as bf

    now = datetime.now(UTC)
    day = timedelta(days=1)
    replay, trades, klines = bf.replay_topic, bf.backfill_trades, bf.backfill_candles
    prices, txs = drain.drain_prices, drain.drain_transactions
    agg, rebuild = aggregate.aggregate, aggregate.rebuild_candles
    feed, activity = ingest.ingest, trading.trading_activity
    check = reconcile.reconcile
    rng = {"venue": "binance", "symbols": ["BTC-USDT"], "start": now - day, "end": now}
    since = {"topic": TRADES, "from_time": now - day}
    return [
        ("replay: users' transactions", replay, since | {"topic": USER_TRANSACTIONS}),
        ("replay: the DLQ", replay, since | {"topic": DLQ}),
        ("replay: a future start", replay, since | {"from_time": now + day}),
        ("replay: reserved word as schema", replay, since | {"schema": "select"}),
        ("backfill: unknown venue", trades, rng | {"venue": "nasdaq"}),
        ("backfill: malformed symbol", trades, rng | {"symbols": ["btc usdt; drop"]}),
        ("backfill: 3,000-char symbol", trades, rng | {"symbols": ["B" * 3000 + "-USD"]}),
        ("backfill: empty symbol list", trades, rng | {"symbols": []}),
        ("backfill: end before start", trades, rng | {"start": now, "end": now - day}),
        ("backfill: range before 2009", trades, rng | {"start": datetime(1970, 1, 1, tzinfo=UTC)}),
        ("backfill: tiny pages over a year", trades, rng | {"start": now - 365 * day,
                                                            "page_minutes": 0.02}),
        ("backfill: schema injection", trades, rng | {"schema": 'public"; drop table trades; --'}),
        ("candles: unknown interval", klines, rng | {"interval": "7x"}),
        ("reconcile: venue without trade history", check, rng | {"venue": "finnhub"}),
        ("reconcile: range not yet settled", check, rng),
        ("reconcile: 40 days in one run", check, rng | {"start": now - 40 * day,
                                                        "end": now - day}),
        ("drain-prices: transactions topic", prices, {"trades_topic": USER_TRANSACTIONS}),
        ("drain-prices: batch size 0", prices, {"batch_size": 0}),
        ("drain-prices: consumer with spaces", prices, {"consumer": "a b"}),
        ("drain-prices: NaN seconds", prices, {"max_seconds": float("nan")}),
        ("drain-prices: DLQ as books topic", prices, {"books_topic": DLQ}),
        ("drain-transactions: prices topic", txs, {"topic": TRADES}),
        ("drain-transactions: books topic", txs, {"topic": BOOKS}),
        ("aggregate: DLQ as output", agg, {"alerts_topic": DLQ}),
        ("aggregate: books topic as output", agg, {"candles_topic": BOOKS}),
        ("aggregate: negative SMA", agg, {"sma": -1}),
        ("aggregate: a zero-bps book band", agg, {"book_bands_bps": [0]}),
        ("rebuild: unicode symbol", rebuild, rng | {"symbols": ["BTC-ÜSD"]}),
        ("ingest: DLQ as trades topic", feed, {"trades_topic": DLQ}),
        ("ingest: unknown venue", feed, {"venue": "nasdaq"}),
        ("trading: price topic", activity, {"topic": TRADES}),
        ("trading: zero users", activity, {"users": 0}),
    ]  # fmt: skip


def parameter_rows() -> Iterator[Row]:
    """Each bad value through Prefect's own parameter validation of the flow (which runs
    the flow's checks, ``flows.common.checked``), as a run started by a worker does."""
    for what, flow, kwargs in bad_parameters():
        try:
            flow.validate_parameters(kwargs)
        except ParameterError as e:
            line = str(e)
            yield Row("parameters", what, "\n" not in line and len(line) < 300, line[:110])
            continue
        except ValueError as e:  # the venue registry's own error names the venue
            yield Row("parameters", what, "\n" not in str(e), str(e)[:110])
            continue
        except Exception as e:
            yield Row("parameters", what, False, f"{type(e).__name__}: {str(e)[:90]}")
            continue
        yield Row("parameters", what, False, "accepted")


# ---- privileges -------------------------------------------------------------------------

REFUSED = (
    ("writer", "DROP TABLE trades"),
    ("writer", "TRUNCATE trades"),
    ("writer", "CREATE TABLE security_sweep (x int)"),
    ("writer", "ALTER TABLE trades ADD COLUMN security_sweep int"),
    ("reader", "DELETE FROM ingest_leases WHERE feed = 'security-sweep: none'"),
    ("reader", "UPDATE kafka_offsets SET next_offset = next_offset WHERE false"),
)
ALLOWED = (
    ("writer", "SELECT count(*) FROM trades"),
    ("writer", "DELETE FROM ingest_leases WHERE feed = 'security-sweep: none'"),
    ("reader", "SELECT count(*) FROM trades"),
)


def _try(dsn: str, statement: str) -> str:
    """'ok', 'refused' (insufficient privilege) or the error's class name; always rolled
    back, so an allowed statement changes nothing."""
    import psycopg2
    from psycopg2 import errors

    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
        return "ok"
    except errors.InsufficientPrivilege:
        return "refused"
    except psycopg2.Error as e:
        return type(e).__name__
    finally:
        conn.rollback()
        conn.close()


OWNERLESS = ("worker", "exporter")  # side processes (and the flow runs they start)


PG_VARIABLES = ("TAPELINE_PG_DSN", "TAPELINE_PG_WRITER_DSN", "TAPELINE_PG_READER_DSN")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}  # gone, or not ours to read
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def pg_passwords(environ: dict[str, str]) -> set[str]:
    """The PostgreSQL passwords an environment gives a process (its DSNs, PGPASSWORD)."""
    found = {unquote(urlsplit(environ[v]).password or "") for v in PG_VARIABLES if environ.get(v)}
    found.add(environ.get("PGPASSWORD", ""))
    return found - {""}


def owner_holders(s: config.Settings) -> tuple[list[str], int]:
    """The worker's, the exporter's and their flow runs' processes whose environment holds
    the PostgreSQL owner's password (they work as the writer and the reader), and how many
    such processes were looked at."""
    password = pg_passwords({"TAPELINE_PG_DSN": s.pg_dsn, "PGPASSWORD": ""})
    password = password or {os.environ.get("PGPASSWORD", "")} - {""}
    procs = {p: n for p, n in stack_pids(s.home).items() if n in OWNERLESS}
    holders = [
        f"{name} pid {pid}"
        for pid, name in sorted(procs.items())
        if password & pg_passwords(_environ(pid))
    ]
    return holders, len(procs)


def privilege_rows(s: config.Settings) -> Iterator[Row]:
    dsns = {"writer": s.pg_writer_dsn, "reader": s.pg_reader_dsn}
    owner = urlsplit(s.pg_dsn).username
    for role, dsn in dsns.items():
        user = urlsplit(dsn).username
        yield Row("privileges", f"{role} is not the owner", user != owner, f"user {user}")
    holders, looked = owner_holders(s)
    yield Row(
        "privileges",
        "worker, flow runs, exporter: no owner password",
        None if not looked else not holders,
        ", ".join(holders) if holders else f"{looked} processes' environments",
    )
    for role, statement in ALLOWED:
        got = _try(dsns[role], statement)
        yield Row("privileges", f"{role} may: {statement[:40]}", got == "ok", got)
    for role, statement in REFUSED:
        got = _try(dsns[role], statement)
        yield Row("privileges", f"{role} may not: {statement[:40]}", got == "refused", got)


# ---- report -----------------------------------------------------------------------------


def sweep(s: config.Settings, areas: tuple[str, ...]) -> list[Row]:
    rows: list[Row] = []
    if "auth" in areas:
        rows += authentication(s)
    if "listeners" in areas:
        rows += listener_rows(s)
    if "secrets" in areas:
        rows += secret_rows(s)
    if "parameters" in areas:
        rows += parameter_rows()
    if "privileges" in areas:
        rows += privilege_rows(s)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.security", description=__doc__)
    areas = ("auth", "listeners", "secrets", "parameters", "privileges")
    p.add_argument("--only", default=",".join(areas), help="comma list of " + ", ".join(areas))
    args = p.parse_args(argv)
    settings = config.load()
    rows = sweep(settings, tuple(a for a in args.only.split(",") if a))
    width = max(len(r.check) for r in rows)
    for r in rows:
        mark = {True: "pass", False: "FAIL", None: "TODO"}[r.ok]
        print(f"{mark}  {r.area:10}  {r.check:{width}}  {r.detail}")
    failed = sum(r.ok is False for r in rows)
    todo = sum(r.ok is None for r in rows)
    print(f"{len(rows)} checks: {len(rows) - failed - todo} pass, {failed} fail, {todo} not built")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
