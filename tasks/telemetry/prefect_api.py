"""A minimal client of the Prefect REST API for processes that must not import Prefect
(the exporter, the security sweep): basic auth from the settings, the CSRF token the
server asks of every state-changing request, and the retry of a busy server's 503."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any


class PrefectApi:
    """``post``/``get`` JSON to one Prefect server. The credentials live in the request
    headers only: never in a URL, a log line or an exception message."""

    def __init__(self, api_url: str, auth: str = "", timeout: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self._auth = base64.b64encode(auth.encode()).decode() if auth else ""
        self._client = uuid.uuid4().hex
        self._csrf = ""

    def __repr__(self) -> str:
        return f"PrefectApi({self.api_url!r})"

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._auth:
            h["Authorization"] = f"Basic {self._auth}"
        if self._csrf:
            h |= {"Prefect-Csrf-Token": self._csrf, "Prefect-Csrf-Client": self._client}
        return h

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path, None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None, attempts: int = 5) -> Any:
        """A server busy with its database answers 503 (SQLite: "database is locked"):
        retried after a short, growing pause, as Prefect's own client does. A 403 about
        CSRF fetches a token once and retries; anything else is raised."""
        csrf_fetched = False
        for attempt in range(attempts):
            req = urllib.request.Request(
                self.api_url + path,
                data=None if body is None else json.dumps(body).encode(),
                headers=self.headers(),
                method=method,
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                if e.code == 403 and not csrf_fetched and method != "GET":
                    csrf_fetched = True
                    self._fetch_csrf()
                    continue
                if e.code != 503 or attempt + 1 == attempts:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _fetch_csrf(self) -> None:
        """The token the server's CSRF protection wants for this client id (a server
        without CSRF protection answers 422: then no token is sent)."""
        try:
            answer = self._call("GET", f"/csrf-token?client={self._client}", None)
        except urllib.error.HTTPError as e:
            if e.code == 422:
                return
            raise
        self._csrf = answer["token"]
