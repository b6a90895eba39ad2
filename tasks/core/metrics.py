"""Every Prometheus metric Tapeline exports, defined once.

Dashboards and alert rules reference these names; ``tests/telemetry/test_monitoring.py`` checks
that every query names a metric defined here. The first four keep the names of the
Distributed-Financial-Data-Platform reference project so its dashboards carry over, but
here "publish success" means the broker acknowledged, never merely queued.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

_SHARD = ("venue", "shard")


class Tally:
    """A metric family for the per-message path (every frame, every acknowledgement),
    exported like prometheus_client's but written without its lock: ``labels`` hands
    each caller a cell of its own, a cell has one writer thread (a shard's reader, a
    producer's network thread) that adds to plain numbers, and a scrape sums the cells
    of each label set. A cell outlives its writer, so totals never go down. Costs
    0.1-0.4 us an update against 1-2.5 us for a locked child."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._cells: list[tuple[tuple[str, ...], _Cell]] = []
        self._lock = threading.Lock()  # labels (rare) against collect (a scrape)
        REGISTRY.register(self)

    def describe(self) -> list[Metric]:
        """The family without samples (what the registry and tests look names up by)."""
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError

    def labels(self, **labels: str) -> _Cell:
        key = tuple(str(labels[n]) for n in self.labelnames)
        cell = self._cell()
        with self._lock:
            self._cells.append((key, cell))
        return cell

    def _cell(self) -> _Cell:
        return _Cell()

    def _by_labels(self) -> dict[tuple[str, ...], list[_Cell]]:
        with self._lock:
            cells = list(self._cells)
        out: dict[tuple[str, ...], list[_Cell]] = {}
        for key, cell in cells:
            out.setdefault(key, []).append(cell)
        return out


class _Cell:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0
        self.created = time.time()

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class TallyCounter(Tally):
    """A ``Counter`` (``<name>_total`` and ``<name>_created``) for the per-message path."""

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, cells in self._by_labels().items():
            total = sum(c.value for c in cells)
            family.add_metric(key, total, created=min(c.created for c in cells))
        yield family


class _Latencies:
    __slots__ = ("bounds", "buckets", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(self.bounds, seconds)] += 1  # bucket i: <= bounds[i]
        self.sum += seconds


class TallyHistogram(Tally):
    """A ``Histogram`` (cumulative ``le`` buckets, ``_sum``, ``_count``, ``_created``) for
    the per-message path."""

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ):  # fmt: skip
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames)

    def _cell(self) -> _Latencies:  # type: ignore[override]
        return _Latencies(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        edges = [*map(floatToGoString, self.bounds), "+Inf"]
        for key, cells in self._by_labels().items():
            counts = [sum(col) for col in zip(*(c.buckets for c in cells), strict=True)]  # type: ignore[attr-defined]
            running, cumulative = 0, []
            for edge, n in zip(edges, counts, strict=True):
                running += n
                cumulative.append((edge, running))
            family.add_metric(key, cumulative, sum(c.sum for c in cells))  # type: ignore[attr-defined]
            family.add_sample(
                self.name + "_created", dict(zip(self.labelnames, key, strict=True)),
                min(c.created for c in cells),
            )  # fmt: skip
        yield family


# Ingestion (flows/ingest.py)
VENDOR_FETCH_SUCCESS = TallyCounter(
    "vendor_fetch_success", "Frames received from the venue and parsed", _SHARD
)
VENDOR_FETCH_FAILURE = Counter(
    "vendor_fetch_failure", "Frames that failed to parse or validate (sent to the DLQ)", _SHARD
)
KAFKA_PUBLISH_SUCCESS = TallyCounter(
    "kafka_publish_success", "Events acknowledged by the Kafka broker", _SHARD
)
KAFKA_PUBLISH_FAILURE = Counter(
    "kafka_publish_failure", "Events the broker did not acknowledge in time", _SHARD
)
RECONNECTS = Counter(
    "tapeline_ws_reconnects", "WebSocket reconnects by cause", ("venue", "shard", "reason")
)
GAPS_FOUND = Counter("tapeline_gaps_found", "Trade-id gaps observed", ("venue", "symbol"))
GAPS_REPAIRED = Counter(
    "tapeline_gaps_repaired", "Trade-id gaps filled from REST history", ("venue", "symbol")
)
TRADES_REPAIRED = Counter(
    "tapeline_trades_repaired", "Trades published from REST history", ("venue", "symbol")
)
DUPLICATES_DROPPED = Counter(
    "tapeline_duplicates_dropped", "Trades already published in this run", ("venue", "symbol")
)
MESSAGES_MISSED = Counter(
    "tapeline_messages_missed",
    "Messages a venue numbered per connection that never arrived (trades among them are "
    "repaired by id; quotes are not)",
    _SHARD,
)
BOOK_RESYNCS = Counter(
    "tapeline_book_resyncs",
    "Order books found out of step and rebuilt (reason: sequence_gap, stale_snapshot, "
    "buffer_full, checksum, crossed, depth); reason=\"checksum\" counts checksum failures",
    ("venue", "reason"),
)
BOOK_AGE = Gauge(
    "tapeline_book_age_seconds",
    "Seconds since the venue last changed a verified book (absent while it is rebuilt)",
    ("venue", "symbol"),
)
BOOKS_OUT_OF_SYNC = Gauge(
    "tapeline_books_out_of_sync", "Books being rebuilt (nothing of them is published)", ("venue",)
)
INFLIGHT = Gauge("tapeline_inflight_messages", "Events sent but not yet acknowledged", ("venue",))
LAST_MESSAGE = Gauge(
    "tapeline_last_message_timestamp_seconds", "When the last frame arrived", _SHARD
)
VENUE_LAG = Gauge(
    "tapeline_venue_lag_seconds", "Receive time minus venue event time, last frame", ("venue",)
)
EVENT_TO_ACK = TallyHistogram(
    "tapeline_event_to_ack_seconds",
    "Venue event time to Kafka acknowledgement",
    ("venue", "channel"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Everything that writes to the DLQ
DLQ_RECORDS = Counter("tapeline_dlq_records", "Records sent to the DLQ", ("source",))

# Drains (flows/drain.py)
DRAIN_ROWS = Counter("tapeline_drain_rows", "Rows newly written", ("sink", "table"))
DRAIN_DUPLICATES = Counter(
    "tapeline_drain_duplicates", "Rows skipped as already stored", ("sink", "table")
)
DRAIN_REJECTS = Counter("tapeline_drain_rejects", "Records sent to the DLQ", ("sink", "topic"))
DRAIN_OFFSET_GAPS = Counter(
    "tapeline_drain_offset_gaps",
    "Records deleted from the log before they were drained, skipped as the operator allowed",
    ("sink", "topic"),
)
DRAIN_BATCH_SECONDS = Histogram(
    "tapeline_drain_batch_seconds",
    "Time to write and commit one batch",
    ("sink",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DRAIN_LAST_SUCCESS = Gauge(
    "tapeline_drain_last_success_timestamp_seconds", "End of the last successful drain", ("flow",)
)
CONSUMER_LAG = Gauge(
    "tapeline_consumer_lag", "Records behind the log end", ("group", "topic", "partition")
)
FRESHNESS = Gauge(
    "tapeline_freshness_seconds", "Age of the newest stored trade", ("venue", "symbol")
)

# The exporter (tasks/telemetry/exporter.py), besides lag and freshness above
FLOW_RUNS_FAILED = Gauge(
    "tapeline_flow_runs_failed",
    "Flow runs that ended Failed or Crashed in the exporter's window (default 1 h)",
    ("flow", "state"),
)
# ... and what the newest reconciled UTC day per venue found (flows/reconcile.py)
RECONCILE_COMPLETENESS = Gauge(
    "tapeline_reconcile_completeness_ratio",
    "Share of the venue's listed trades that were stored when reconcile checked its newest day",
    ("venue",),
)
RECONCILE_MISSING = Gauge(
    "tapeline_reconcile_missing_trades",
    "Trades the venue lists that were not stored, newest reconciled day",
    ("venue",),
)
RECONCILE_EXTRA = Gauge(
    "tapeline_reconcile_extra_trades",
    "Stored trades the venue does not list, newest reconciled day",
    ("venue",),
)
RECONCILE_DAY = Gauge(
    "tapeline_reconcile_day_timestamp_seconds",
    "Start (UTC) of the newest day reconcile checked",
    ("venue",),
)
EXPORTER_ERRORS = Counter(
    "tapeline_exporter_errors", "Exporter probes that could not reach their source", ("probe",)
)


def serve(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> WSGIServer | None:
    """Expose ``registry`` (this process's metrics) over HTTP (port 0: do not serve);
    returns the server, for an endpoint that must end with its owner."""
    if not port:
        return None
    server, _ = start_http_server(port, addr, registry)
    return server


def serve_loopback() -> int:
    """Expose this process's metrics on a loopback port the OS picks, for a supervising
    process to gather (never a scrape target itself); returns the port."""
    server, _ = start_http_server(0, "127.0.0.1")
    return server.server_port


# No proxy: a loopback fetch must not follow an http_proxy from the environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(port: int, timeout_s: float) -> list[Metric]:
    """The families another process serves on loopback ``port`` (raises OSError if it
    does not answer within ``timeout_s``, ValueError if its page does not parse)."""
    url = f"http://127.0.0.1:{port}/metrics"
    ask = urllib.request.Request(url, headers={"Accept": CONTENT_TYPE_LATEST})
    with _LOOPBACK.open(ask, timeout=timeout_s) as r:
        return parse(r.read().decode())


def parse(text: str) -> list[Metric]:
    """Families of an OpenMetrics exposition, by prometheus_client's own parser.

    OpenMetrics, not the 0.0.4 text format: that one carries a counter's ``_created`` as a
    gauge family of its own, which re-exposed as OpenMetrics (what Prometheus asks for
    first) clashes with the counter's reserved ``_created`` sample; OpenMetrics keeps it
    in the counter's family, and re-exposed either way it reads as the child's own page."""
    return list(text_string_to_metric_families(text))


def own() -> list[Metric]:
    """This process's families as another process's would be fetched: through the
    exposition, so that merged families have one shape."""
    return parse(generate_latest(REGISTRY).decode())


def merge(sources: Mapping[str, Iterable[Metric]], label: str) -> list[Metric]:
    """Several processes' families as one set: every sample gets ``label`` = its source's
    key and families of one name become one (one HELP and TYPE in the exposition), so
    each series stays apart and summing over ``label`` gives the whole."""
    merged: dict[str, Metric] = {}
    for value, families in sources.items():
        for f in families:
            into = merged.setdefault(f.name, Metric(f.name, f.documentation, f.type, f.unit))
            into.samples += [s._replace(labels={**s.labels, label: value}) for s in f.samples]
    return list(merged.values())
