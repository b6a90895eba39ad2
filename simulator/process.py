"""Run the simulator as a child process and control it over HTTP.

A separate process gets its own core (the in-process thread shares the GIL with the
code under test), which is what high-rate runs and end-to-end tests want. The control
methods mirror ``Simulator``'s: ``report``, ``set_faults``, ``inject``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from simulator.server import CONTROL_HEADER, CONTROL_TOKEN_ENV

ROOT = Path(__file__).resolve().parent.parent


class SimulatorProcess:
    """``python -m simulator`` with the given CLI arguments; ``--port 0`` unless given."""

    def __init__(self, *args: str, timeout: float = 15.0):
        argv = list(args)
        if "--port" not in argv:
            argv += ["--port", "0"]
        self.control_token = secrets.token_urlsafe(24)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", *argv],
            cwd=ROOT,
            env={**os.environ, CONTROL_TOKEN_ENV: self.control_token},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = _readline(self.proc, timeout)
        if not line:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"simulator did not start: {err.strip()[-2000:]}")
        info = json.loads(line)
        self.port: int = info["port"]
        self.http_url: str = info["http"]
        self._ws: dict[str, str] = info["ws"]
        # keep draining stderr so a chatty child never blocks on a full pipe
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def ws_url(self, venue: str = "binance") -> str:
        return self._ws[venue]

    def rest_url(self, venue: str = "binance") -> str:
        return self.http_url

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.http_url}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, headers={CONTROL_HEADER: self.control_token})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: {e.code} {e.read().decode()[:500]}") from None

    def report(self) -> dict[str, Any]:
        return self.get("/_sim/report")

    def set_faults(self, venue: str = "binance", **settings: float) -> dict[str, Any]:
        return self.get("/_sim/faults", venue=venue, **settings)

    def inject(self, action: str, venue: str = "binance", **params: Any) -> dict[str, Any]:
        return self.get(f"/_sim/inject/{action}", venue=venue, **params)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """First stdout line, or '' if the process exits or stays silent past ``timeout``."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""
