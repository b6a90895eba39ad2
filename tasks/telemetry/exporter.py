"""Consumer lag, data freshness, reconciliation and failed flow runs, measured from
outside the pipeline.

None of these can be counted by the code doing the work: lag is the distance between
what the broker holds and what a consumer group has committed, and a stopped drain
reports nothing at all; freshness is what the database holds, whoever wrote it; failed
and crashed flow runs are known to the Prefect API (a crashed run never ran its own
cleanup). So one small long-running process asks Kafka, PostgreSQL and Prefect every
``interval`` seconds and serves the answers as gauges:

    python -m tasks.telemetry.exporter --port 9110 --interval 15

Each probe fails on its own: an unreachable source counts ``tapeline_exporter_errors``
for that probe and leaves its gauges as they were, so one outage neither blanks the
others nor stops the loop. Series of groups, partitions or symbols that disappear are
removed, not left at their last value.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka.admin import OffsetSpec
from kafka.protocol.consumer.offsets import IsolationLevel
from prometheus_client import Gauge

from tasks.core import config
from tasks.core.kafka import admin
from tasks.core.metrics import (
    CONSUMER_LAG,
    EXPORTER_ERRORS,
    FLOW_RUNS_FAILED,
    FRESHNESS,
    RECONCILE_COMPLETENESS,
    RECONCILE_DAY,
    RECONCILE_EXTRA,
    RECONCILE_MISSING,
    serve,
)
from tasks.telemetry.prefect_api import PrefectApi

log = logging.getLogger("tapeline.exporter")

DEFAULT_PORT = 9110
DAY_US = 86_400_000_000
GROUP_PREFIX = "tapeline"  # the drains' consumer groups; test and ad hoc groups are skipped
FAILED_STATES = ("FAILED", "CRASHED")
PAGE = 200  # the Prefect API's largest page
MAX_PAGES = 10  # at most 2000 failed runs counted per window: far past any alert threshold

# Newest stored trade per (venue, symbol); a pair silent for longer than the window is
# no longer reported (a delisted symbol must not alert forever). A loose index scan
# finds the pairs, then one index probe per pair finds its newest trade.
FRESHNESS_SQL = """
WITH RECURSIVE pairs AS (
    (SELECT venue, symbol FROM trades ORDER BY venue, symbol LIMIT 1)
    UNION ALL
    SELECT n.venue, n.symbol
    FROM pairs p,
    LATERAL (
        SELECT venue, symbol FROM trades
        WHERE (venue, symbol) > (p.venue, p.symbol)
        ORDER BY venue, symbol
        LIMIT 1
    ) n
)
SELECT p.venue, p.symbol, newest.event_us
FROM pairs p,
LATERAL (
    SELECT event_us FROM trades t
    WHERE t.venue = p.venue AND t.symbol = p.symbol
    ORDER BY event_us DESC
    LIMIT 1
) newest
WHERE newest.event_us >= %(since_us)s
"""


@dataclass(frozen=True)
class DayCompleteness:
    """One venue's newest reconciled UTC day, as the exporter shows it."""

    venue: str
    day_us: int
    venue_trades: int
    missing: int
    extra: int
    refilled: int

    @property
    def ratio(self) -> float:
        """Share of the venue's trades that were stored when checked (1.0 for a day the
        venue listed none)."""
        if not self.venue_trades:
            return 1.0
        return (self.venue_trades - self.missing) / self.venue_trades


NEWEST_DAYS_SQL = """
WITH newest AS (
    SELECT venue, max(hour_us) - max(hour_us) %% %(day)s AS day_us
    FROM reconcile_hours GROUP BY venue
)
SELECT r.venue, n.day_us, sum(r.venue_trades), sum(r.missing), sum(r.extra), sum(r.refilled)
FROM reconcile_hours r JOIN newest n USING (venue)
WHERE r.hour_us >= n.day_us AND r.hour_us < n.day_us + %(day)s
GROUP BY r.venue, n.day_us
"""


def newest_days(conn) -> list[DayCompleteness]:
    """Per venue, the newest UTC day any check covered, summed over its checked hours."""
    with conn.cursor() as cur:
        cur.execute(NEWEST_DAYS_SQL, {"day": DAY_US})
        return [DayCompleteness(v, d, int(n), int(m), int(e), int(r)) for v, d, n, m, e, r in cur]


def consumer_lag(client: Any, group_prefix: str = GROUP_PREFIX) -> dict[tuple[str, str, str], int]:
    """Records behind the log end per (group, topic, partition), for the groups whose
    id starts with ``group_prefix`` and the partitions they have committed.

    The end is the last stable offset (what a read_committed consumer can reach).
    """
    groups = sorted(g["group_id"] for g in client.list_groups())
    groups = [g for g in groups if g.startswith(group_prefix)]
    if not groups:
        return {}
    committed = client.list_group_offsets(groups)
    partitions = {tp for offsets in committed.values() for tp in offsets}
    ends = client.list_partition_offsets(
        {tp: OffsetSpec.LATEST for tp in partitions}, isolation_level=IsolationLevel.READ_COMMITTED
    )
    lag: dict[tuple[str, str, str], int] = {}
    for group, offsets in committed.items():
        for tp, meta in offsets.items():
            if meta.offset < 0 or tp not in ends:  # nothing committed for this partition
                continue
            lag[(group, tp.topic, str(tp.partition))] = max(ends[tp].offset - meta.offset, 0)
    return lag


def freshness(conn: Any, now: float, window_s: float) -> dict[tuple[str, str], float]:
    """Seconds since the newest stored trade per (venue, symbol), within ``window_s``."""
    since_us = int((now - window_s) * 1_000_000)
    with conn.cursor() as cur:
        cur.execute(FRESHNESS_SQL, {"since_us": since_us})
        rows = cur.fetchall()
    return {
        (venue, symbol): max(now - event_us / 1_000_000, 0.0) for venue, symbol, event_us in rows
    }


def failed_flow_runs(
    api: PrefectApi, now: datetime, window: timedelta
) -> dict[tuple[str, str], int]:
    """Flow runs that ended Failed or Crashed within ``window``, per (flow name, state)."""
    runs_filter = {
        "state": {"type": {"any_": list(FAILED_STATES)}},
        "end_time": {"after_": (now - window).isoformat()},
    }
    counts: dict[tuple[str, str], int] = {}
    for page in range(MAX_PAGES):
        body = {"flow_runs": runs_filter, "limit": PAGE, "offset": page * PAGE}
        runs = api.post("/flow_runs/filter", body)
        for run in runs:
            key = (run["flow_id"], run["state_type"].lower())
            counts[key] = counts.get(key, 0) + 1
        if len(runs) < PAGE:
            break
    if not counts:
        return {}
    ids = sorted({flow_id for flow_id, _ in counts})
    flows = api.post("/flows/filter", {"flows": {"id": {"any_": ids}}, "limit": PAGE})
    names = {f["id"]: f["name"] for f in flows}
    named: dict[tuple[str, str], int] = {}
    for (flow_id, state), n in counts.items():
        key = (names.get(flow_id, flow_id), state)
        named[key] = named.get(key, 0) + n
    return named


# What the newest reconciled day per venue shows (see tasks.history.reconcile).
RECONCILE_GAUGES: dict[str, tuple[Gauge, Callable[[Any], float]]] = {
    "completeness": (RECONCILE_COMPLETENESS, lambda d: d.ratio),
    "missing": (RECONCILE_MISSING, lambda d: d.missing),
    "extra": (RECONCILE_EXTRA, lambda d: d.extra),
    "day": (RECONCILE_DAY, lambda d: d.day_us / 1_000_000),
}


def publish(gauge: Gauge, values: dict[tuple[str, ...], float], shown: set[Hashable]) -> None:
    """Set ``values`` on ``gauge`` and remove the series shown before but gone now."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for labels in shown - set(values):
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
    shown.clear()
    shown.update(values)


class Exporter:
    """Runs the three probes on a schedule and keeps their gauges current."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        group_prefix: str = GROUP_PREFIX,
        freshness_window_s: float = 86_400.0,
        failures_window: timedelta = timedelta(hours=1),
    ):
        self.settings = settings
        self.group_prefix = group_prefix
        self.freshness_window_s = freshness_window_s
        self.failures_window = failures_window
        self._admin: Any = None
        self._prefect = PrefectApi(settings.prefect_api_url, settings.prefect_auth)
        self._shown: dict[str, set[Hashable]] = {
            name: set() for name in ("lag", "freshness", "flows", *RECONCILE_GAUGES)
        }

    def collect(self) -> dict[str, bool]:
        """One round of every probe; returns which probes succeeded."""
        return {
            "kafka": self._probe("kafka", self._lag),
            "postgres": self._probe("postgres", self._freshness),
            "reconcile": self._probe("reconcile", self._reconcile),
            "prefect": self._probe("prefect", self._flow_runs),
        }

    def _probe(self, name: str, probe: Callable[[], None]) -> bool:
        try:
            probe()
            return True
        except Exception as e:  # any failure of a source is counted, never fatal
            EXPORTER_ERRORS.labels(probe=name).inc()
            log.warning("%s probe failed: %s", name, e)
            if name == "kafka":
                self.close()
            return False

    def _lag(self) -> None:
        if self._admin is None:
            self._admin = admin(self.settings, request_timeout_ms=10_000)
        lag = consumer_lag(self._admin, self.group_prefix)
        publish(CONSUMER_LAG, lag, self._shown["lag"])

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Any]:
        """A read-only PostgreSQL session as the reader role, statements capped at 10 s."""
        import psycopg2

        conn = psycopg2.connect(self.settings.pg_reader_dsn, connect_timeout=5)
        try:
            conn.set_session(readonly=True, autocommit=True)
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '10s'")
            yield conn
        finally:
            conn.close()

    def _freshness(self) -> None:
        with self._reader() as conn:
            ages = freshness(conn, time.time(), self.freshness_window_s)
        publish(FRESHNESS, ages, self._shown["freshness"])

    def _reconcile(self) -> None:
        with self._reader() as conn:
            days = newest_days(conn)
        for name, (gauge, value) in RECONCILE_GAUGES.items():
            publish(gauge, {(d.venue,): value(d) for d in days}, self._shown[name])

    def _flow_runs(self) -> None:
        now = datetime.now(UTC)
        failed = failed_flow_runs(self._prefect, now, self.failures_window)
        publish(FLOW_RUNS_FAILED, failed, self._shown["flows"])

    def close(self) -> None:
        """Release the Kafka admin client (a new one is made on the next round)."""
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def run(self, interval: float, stop: threading.Event) -> None:
        """Collect every ``interval`` seconds until ``stop`` is set."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                self.collect()
                stop.wait(max(interval - (time.monotonic() - started), 0.0))
        finally:
            self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="metrics port")
    parser.add_argument("--host", help="address to serve metrics on (TAPELINE_LISTEN_HOST)")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between probes")
    parser.add_argument("--group-prefix", default=GROUP_PREFIX, help="consumer groups to watch")
    parser.add_argument(
        "--freshness-window", type=float, default=86_400.0,
        help="seconds: pairs with no trade for longer are not reported",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = config.load()
    exporter = Exporter(
        settings, group_prefix=args.group_prefix, freshness_window_s=args.freshness_window
    )
    serve(args.port, args.host or settings.listen_host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("exporter serving on %s:%d, probing every %.0f s", args.host, args.port, args.interval)
    exporter.run(args.interval, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
