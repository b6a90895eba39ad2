"""What the flows share: where a run reads and writes, the schema step, retries, times.

Flows are runbooks; anything two of them need lives here once, so a flow module holds
only its own steps.
"""

from __future__ import annotations

import inspect
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg2.errors
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks import settings as block_settings
from tasks.core import config
from tasks.core.kafka import producer as kafka_producer
from tasks.core.pg import connect
from tasks.drain.migrate import MigrationError, migrate, pending

F = TypeVar("F")

# Prefect validates a flow's parameters with a pydantic model whose base has a ``schema``
# method; flows with a ``schema`` parameter (the PostgreSQL schema) warn on every run.
warnings.filterwarnings(
    "ignore", message=r'Field name "schema" in ".*" shadows an attribute', category=UserWarning
)


def checked(check: Callable[..., None]) -> Callable[[F], F]:
    """Run ``check(**parameters)`` (defaults filled in) as part of Prefect's own parameter
    validation of a flow. That happens before the run is Running and before any line of
    the flow, so a refused value (``tasks.core.params.ParameterError``) fails the run once
    with its one-line reason: no side effect, and no flow retry (Prefect retries only runs
    that failed while Running). Direct calls and worker-started runs go through it alike."""

    def wrap(f: F) -> F:
        validate = f.validate_parameters  # type: ignore[attr-defined]
        signature = inspect.signature(f.fn)  # type: ignore[attr-defined]

        def validate_and_check(parameters: dict[str, Any]) -> dict[str, Any]:
            validated = validate(parameters)
            bound = signature.bind_partial(**validated)
            bound.apply_defaults()
            check(**bound.arguments)
            return validated

        f.validate_parameters = validate_and_check  # type: ignore[attr-defined]
        return f

    return wrap


# A failed drain or schema step is safe to run again at once (a drain resumes from the
# offsets stored with the data), so such tasks retry with growing, jittered delays (a
# database restarting, a broker electing leaders). Prefect's flow retries take one fixed
# delay only, hence the backoff sits on the tasks.
RETRIES = {"retries": 3, "retry_delay_seconds": [5, 15, 45], "retry_jitter_factor": 0.5}


@dataclass(frozen=True)
class Target:
    """Where a run reads and writes: connection settings and the PostgreSQL schema."""

    settings: config.Settings
    schema: str = "public"

    def connect(self):
        return connect(self.settings.pg_writer_dsn, self.schema)

    def producer(self):
        return kafka_producer(self.settings)


def target(kafka_block: str | None, postgres_block: str | None, schema: str) -> Target:
    """Settings from the named blocks (else the environment), schema migrated."""
    t = Target(block_settings(kafka=kafka_block, postgres=postgres_block), schema)
    migrate_schema(t.settings, t.schema)
    return t


def _not_a_migration_refusal(task, task_run, state) -> bool:
    """Retry lost connections, not a refusal: retrying cannot grant a role rights."""
    return not isinstance(state.result(raise_on_failure=False), MigrationError)


@task(
    name="migrate-schema",
    cache_policy=NO_CACHE,
    retry_condition_fn=_not_a_migration_refusal,
    **RETRIES,
)
def migrate_schema(settings: config.Settings, schema: str) -> list[str]:
    """Check the schema is at this code's migrations (as the writer, no lock taken); apply
    the missing ones only when they are missing, which needs the owner (see
    ``tasks.drain.migrate``). A worker holding only the writer's credentials never needs
    more while the main command or compose's ``migrate`` service has run them."""
    todo = pending(settings.pg_writer_dsn, schema)
    if not todo:
        return []
    try:
        applied = migrate(settings.pg_dsn, schema)
    except psycopg2.errors.InsufficientPrivilege:
        raise MigrationError(
            f"schema {schema!r} lacks migrations {', '.join(todo)} and this run's PostgreSQL"
            f" role may not apply them: run `python -m tasks.drain.migrate --schema {schema}`"
            " with the owner's TAPELINE_PG_DSN"
        ) from None
    if applied:
        get_run_logger().info("applied migrations: %s", ", ".join(applied))
    return applied


def to_us(t: datetime | str | int) -> int:
    """Epoch microseconds from a datetime (naive means UTC), ISO text or an int."""
    if isinstance(t, int):
        return t
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def iso(us: int) -> str:
    """Epoch microseconds as ISO 8601 in UTC, to the second (for logs and artifacts)."""
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat(timespec="seconds")


# How often a long run asks the server whether it was declared dead (see ended_by_server).
ENDED_CHECK_S = 30.0


def ended_by_server(run_id: str) -> bool:
    """True once the Prefect server holds flow run ``run_id`` in a final state. A server
    outage longer than the silent-run window makes the automation end a live run Crashed
    and its trigger start a replacement; without this check both would send, doubling the
    users' activity (trading) or leave the replacement waiting on the lease of its symbols while
    the ended run publishes on (ingestion). An unreachable server is not an ending."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
    except Exception:
        return False
    return state is not None and state.is_final()


def watch_ending(ended: threading.Event) -> None:
    """Set ``ended`` once the server has ended this flow run; asks every ENDED_CHECK_S in
    a thread of its own, since the client may wait minutes on a server that is down and
    the run's work must not pause meanwhile."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return

    def loop() -> None:
        while not ended.wait(ENDED_CHECK_S):
            if ended_by_server(run_id):
                ended.set()

    threading.Thread(target=loop, name="ended-by-server", daemon=True).start()


_NOTICING: weakref.WeakSet[threading.Event] = weakref.WeakSet()
_hook_lock = threading.Lock()


def sigterm_noticed() -> threading.Event:
    """An Event set when Python swallows the TerminationSignal that Prefect's SIGTERM
    handler raises. Such an exception that lands while the main thread runs a weakref or
    GC callback is only reported ("Exception ignored in ...", through
    ``sys.unraisablehook``), and a run that streams until stopped would never stop: seen
    in CI. Loops that run until stopped check the Event (``stop_if_terminated``). Prefect's
    handler stays the one installed, so its cancel handshake (which checks that it is)
    keeps working. The Event lives as long as the caller holds it."""
    with _hook_lock:
        if not getattr(sys.unraisablehook, "_tapeline", False):  # once (pytest swaps it)
            previous = sys.unraisablehook

            def hook(unraisable: Any) -> None:
                from prefect.exceptions import TerminationSignal

                if isinstance(unraisable.exc_value, TerminationSignal):
                    for event in list(_NOTICING):
                        event.set()
                previous(unraisable)

            hook._tapeline = True  # type: ignore[attr-defined]
            sys.unraisablehook = hook
    noticed = threading.Event()
    _NOTICING.add(noticed)
    return noticed


def stop_if_terminated(terminated: threading.Event) -> None:
    """Raise what Prefect's SIGTERM handler raises, once ``terminated`` is set."""
    if terminated.is_set():
        from prefect.exceptions import TerminationSignal

        raise TerminationSignal(signal.SIGTERM)
