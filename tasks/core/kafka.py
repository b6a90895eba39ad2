"""The one place Kafka clients are made.

Producer guarantees (kept here, not per caller): idempotent, ``acks=all``, at most 5
requests in flight (the idempotent limit that still keeps per-partition order), lz4,
unbounded retries within ``delivery_timeout_ms``. Callers count success only in the
delivery callback/future, never when ``send`` returns.

Consumers never auto-commit: a sink commits offsets only after its write is durable.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.producer.transaction_manager import TransactionManager, TransactionState

from tasks.core import config

_reset_producer_id = TransactionManager.reset_producer_id


def _reset_and_reinitialise(self: TransactionManager) -> None:
    """kafka-python 3.0.12 resets the producer id when a batch the broker may have written
    expires (Kafka unreachable for longer than ``delivery_timeout_ms``), but leaves the
    state READY, while the sender asks for a new id only from UNINITIALIZED: the idempotent
    producer then never sends another record, and ingestion hangs at its in-flight bound
    with the broker back (``tests/ingest/test_publish.py``). Back to UNINITIALIZED, the
    sender's next round asks for a new id, as the Java client does. (If the library renames
    what this touches, that test hangs at its bound and fails.)"""
    with self._lock:  # re-entrant: the original takes it too
        _reset_producer_id(self)
        if self._current_state == TransactionState.READY:
            self._current_state = TransactionState.UNINITIALIZED


TransactionManager.reset_producer_id = _reset_and_reinitialise  # type: ignore[method-assign]


def _settings(settings: config.Settings | None) -> config.Settings:
    return settings or config.load()


def producer(settings: config.Settings | None = None, **overrides: Any) -> KafkaProducer:
    kafka = _settings(settings).kafka
    kw: dict[str, Any] = {
        **kafka.client_kwargs(),
        "enable_idempotence": True,
        "acks": "all",
        "max_in_flight_requests_per_connection": 5,
        "compression_type": "lz4",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "delivery_timeout_ms": kafka.delivery_timeout_ms,
        # kafka-python wants a request to fit in the delivery timeout
        "request_timeout_ms": min(30_000, kafka.delivery_timeout_ms // 3),
        "client_id": "tapeline",
    }
    kw.update(overrides)
    return KafkaProducer(**kw)


def consumer(
    group_id: str | None, settings: config.Settings | None = None, **overrides: Any
) -> KafkaConsumer:
    """An unsubscribed consumer: callers ``assign`` or ``subscribe`` themselves."""
    kw: dict[str, Any] = {
        **_settings(settings).kafka.client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": 5000,
        "fetch_max_bytes": 50 * 1024 * 1024,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "client_id": "tapeline",
    }
    kw.update(overrides)
    return KafkaConsumer(**kw)


def admin(settings: config.Settings | None = None, **overrides: Any) -> KafkaAdminClient:
    kw = {**_settings(settings).kafka.client_kwargs(), "client_id": "tapeline-admin"}
    kw.update(overrides)
    return KafkaAdminClient(**kw)
