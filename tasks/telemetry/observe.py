"""Drain metrics pushed to a Prometheus Pushgateway, so short flow runs are seen.

Why a Pushgateway rather than an endpoint: every scheduled drain is a flow run in its
own process (the process worker starts one per run) that lives for seconds. Prometheus
scrapes every 15 s and would miss most runs, and the worker's own endpoint cannot see
its children's counters. So a run pushes its drain metrics when it ends, to the group
``{job="tapeline-drain", flow=<flow name>}``; the gateway keeps them until the next push
and Prometheus scrapes it with ``honor_labels`` so the pushed ``job``/``flow`` are kept.

Counters stay counters. The gateway replaces a group on every push, so pushing a fresh
process's counts would make each run look like a counter reset to a similar value
(100 rows, then 100 rows again: ``increase()`` sees nothing). Each push therefore adds
the increments this process made since its last successful push to the values the
gateway holds, and keeps the last-success gauge of an earlier run when this run has not
set it (a failed run must not erase when the drain last succeeded). The read-add-write
is exact because runs of one drain flow do not overlap (the drain deployments have a
concurrency limit of 1); overlapping runs could lose one run's increments, never count
one twice. A gateway restart starts the sums again, which Prometheus reads as a reset.

Pushed series live in a dedicated ``CollectorRegistry`` built per push, never in the
process registry, so a long-running process's own endpoint is not mixed with them.
Pushing never fails a drain: metrics are best effort, the data path is not.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from tasks.core.metrics import (
    DLQ_RECORDS,
    DRAIN_BATCH_SECONDS,
    DRAIN_DUPLICATES,
    DRAIN_LAST_SUCCESS,
    DRAIN_OFFSET_GAPS,
    DRAIN_REJECTS,
    DRAIN_ROWS,
)

JOB = "tapeline-drain"
# What a drain run pushes: everything it records, and nothing of the process.
DRAIN_METRICS = (
    DRAIN_ROWS,
    DRAIN_DUPLICATES,
    DRAIN_REJECTS,
    DRAIN_BATCH_SECONDS,
    DRAIN_LAST_SUCCESS,
    DRAIN_OFFSET_GAPS,
    DLQ_RECORDS,
)
# Labels the gateway sets from the grouping key (``instance`` it adds, empty).
_GROUP_LABELS = frozenset({"job", "flow", "instance"})
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}

Key = tuple[str, tuple[tuple[str, str], ...]]
log = logging.getLogger(__name__)

_lock = threading.Lock()
# Per sample of a cumulative metric: the value this process has already added to the gateway.
_pushed: dict[Key, float] = {}


def push_drain_metrics(
    flow_name: str,
    metrics: Iterable[Any] = DRAIN_METRICS,
    *,
    url: str,
    timeout: float = 5.0,
) -> bool:
    """Add this process's drain metrics to the gateway's group for ``flow_name``.

    ``metrics`` are prometheus_client collectors (default: every drain metric of
    ``tasks.core.metrics``). ``url`` is ``Settings.pushgateway_url``. Returns whether
    a push happened; a gateway that is unset, down or refusing is logged, never raised.
    """
    url = url.strip()
    if not url:
        return False
    base = url if "://" in url else f"http://{url}"
    with _lock:
        try:
            held = _held_values(base, flow_name, timeout)
            families, sent = _merge(flow_name, metrics, held)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Families(families))
            push_to_gateway(
                base, job=JOB, registry=registry, grouping_key={"flow": flow_name}, timeout=timeout
            )
        except (OSError, ValueError) as e:  # URLError/HTTPError are OSErrors
            log.warning("push of drain metrics for %s to %s failed: %s", flow_name, url, e)
            return False
        _pushed.update(sent)
        return True


class _Families:
    """A collector that yields fixed metric families (the merged push)."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _key(name: str, labels: dict[str, str]) -> Key:
    kept = {k: v for k, v in labels.items() if k not in _GROUP_LABELS}
    if "le" in kept:  # "1.0" here, "1" from the gateway: compare as numbers
        kept["le"] = floatToGoString(float(kept["le"]))
    return name, tuple(sorted(kept.items()))


def _order(item: tuple[Key, float]) -> tuple[Any, ...]:
    """Exposition order: per series, buckets by ascending bound, then _count and _sum."""
    (name, labels), _ = item
    rest = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    return rest, name, float(le) if le is not None else 0.0


def _held_values(base: str, flow_name: str, timeout: float) -> dict[Key, float]:
    """The samples the gateway holds for this flow's group, keyed without group labels."""
    with urllib.request.urlopen(f"{base.rstrip('/')}/metrics", timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    held: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == JOB and s.labels.get("flow") == flow_name:
                held[_key(s.name, s.labels)] = s.value
    return held


def _merge(
    flow_name: str, metrics: Iterable[Any], held: dict[Key, float]
) -> tuple[list[Metric], dict[Key, float]]:
    """The families to push, and the cumulative values they account for."""
    families: list[Metric] = []
    sent: dict[Key, float] = {}
    for collector in metrics:
        for family in collector.collect():
            names = {family.name + suffix for suffix in _SUFFIXES[family.type]}
            cumulative = family.type != "gauge"
            values = {k: v for k, v in held.items() if k[0] in names}
            for s in family.samples:
                if s.name not in names or s.labels.get("flow", flow_name) != flow_name:
                    continue  # _created, or another flow's gauge in a shared process
                key = _key(s.name, s.labels)
                if cumulative:
                    values[key] = values.get(key, 0.0) + s.value - _pushed.get(key, 0.0)
                    sent[key] = s.value
                else:
                    values[key] = s.value
            if values:
                merged = Metric(family.name, family.documentation, family.type)
                for (name, labels), value in sorted(values.items(), key=_order):
                    merged.add_sample(name, dict(labels), value)
                families.append(merged)
    return families, sent
