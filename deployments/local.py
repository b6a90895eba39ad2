"""The processes the local environment runs beside the stack's services.

On a laptop or CI machine there is no compose file to start a worker, the exchange
simulator, the lag exporter or a Pushgateway, so this module does, with the same pid
files, logs and health checks as ``stack`` (everything under ``$TAPELINE_HOME``).
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from deployments import setup
from stack.process import read_pid, spawn, stop, wait_until
from tasks.core import config

ROOT = Path(__file__).resolve().parent.parent
PUSHGATEWAY_PORT = 9091
EXPORTER_PORT = 9110


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


@dataclass
class Side:
    """One background process: how to start it and how to know it works."""

    name: str
    cmd: list[str]
    health_url: str
    env: dict[str, str] = field(default_factory=dict)

    def paths(self, home: Path) -> tuple[Path, Path]:
        return home / "logs" / f"{self.name}.log", home / "run" / f"{self.name}.pid"

    def up(self, home: Path, timeout: float = 60.0) -> str:
        log, pidfile = self.paths(home)
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        try:
            if _http_ok(self.health_url):
                return "running"
        except OSError:
            pass
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}  # the code runs from here
        pid = spawn(self.cmd, log, pidfile, env=env, cwd=ROOT)
        wait_until(lambda: _http_ok(self.health_url), self.name, log, timeout, pid)
        return "started"

    def down(self, home: Path) -> bool:
        return stop(self.paths(home)[1])

    def running(self, home: Path) -> bool:
        return read_pid(self.paths(home)[1]) is not None


def sides(
    settings: config.Settings,
    symbols: list[str],
    simulate: bool,
    start_ids: dict[str, int] | None = None,
) -> list[Side]:
    """``start_ids``: first trade id per symbol for a newly started simulator, so its ids
    continue the stored history (a restarted ingestion then has nothing to repair)."""
    py = sys.executable
    prefect = str(Path(py).parent / "prefect")
    # What runs beside the stack gets the PostgreSQL roles it works as, never the owner:
    # flow runs (through the worker) write as the writer, the exporter reads as the reader.
    roles = {
        "TAPELINE_PG_DSN": settings.pg_writer_dsn,
        "TAPELINE_PG_WRITER_DSN": settings.pg_writer_dsn,
        "TAPELINE_PG_READER_DSN": settings.pg_reader_dsn,
    }
    env = {
        **settings.prefect_env(),
        "TAPELINE_CODE_DIR": str(ROOT),
        "TAPELINE_PUSHGATEWAY_URL": settings.pushgateway_url
        or f"http://127.0.0.1:{PUSHGATEWAY_PORT}",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    out: list[Side] = []
    if simulate:
        sim = urlsplit(settings.simulator_url)
        out.append(
            Side(
                "simulator",
                [
                    py,
                    "-m",
                    "simulator",
                    "--host",
                    sim.hostname or "127.0.0.1",
                    "--port",
                    str(sim.port or 18765),
                    "--symbols",
                    ",".join(symbols),
                    "--rate",
                    str(settings.simulator_rate),
                    "--start-ids",
                    ",".join(f"{s}={i}" for s, i in (start_ids or {}).items()),
                ],
                f"{settings.simulator_url}/_sim/health",
            )
        )
    gateway = shutil.which("prometheus-pushgateway")
    if gateway:
        out.append(
            Side(
                "pushgateway",
                [gateway, f"--web.listen-address=127.0.0.1:{PUSHGATEWAY_PORT}"],
                f"http://127.0.0.1:{PUSHGATEWAY_PORT}/-/healthy",
            )
        )
    else:
        env["TAPELINE_PUSHGATEWAY_URL"] = ""
    out.append(
        Side(
            "exporter",
            [
                py,
                "-m",
                "tasks.telemetry.exporter",
                "--host",
                "127.0.0.1",
                "--port",
                str(EXPORTER_PORT),
            ],
            f"http://127.0.0.1:{EXPORTER_PORT}/metrics",
            {**env, **dict.fromkeys(roles, settings.pg_reader_dsn)},
        )
    )
    out.append(
        Side(
            "worker",
            [
                prefect,
                "worker",
                "start",
                "--pool",
                "tapeline",
                "--type",
                "process",
                "--with-healthcheck",
            ],
            "http://127.0.0.1:8080/health",
            {
                **env,
                **roles,
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": "8080",
                # Flow-run processes inherit it: a heartbeat every 30 s (Prefect's least),
                # so a run whose process died is called silent in minutes, not 10.
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(setup.HEARTBEAT_S),
            },
        )
    )
    return out
