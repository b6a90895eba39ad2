"""Register everything a Prefect environment needs to run Tapeline's deployments.

    python -m deployments.setup            # local stack: schema, pool, blocks, deployments,
                                           # automations
    TAPELINE_CODE_DIR=/app python -m deployments.setup    # what the compose worker runs

The schema's migrations are applied here when the settings hold the owner (the local
stack); the compose worker holds only the writer, and compose's ``migrate`` service has
applied them before it starts. Flow runs started by the worker need no DDL rights.

Idempotent: the work pool is created only when missing, blocks and deployments are
overwritten with the current settings, the automations are replaced. The deployments
themselves live in prefect.yaml; this only prepares the ground and calls
``prefect --no-prompt deploy --all`` (which fails when the pool does not exist).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from uuid import UUID

from blocks import prefect_api
from blocks.__main__ import main as register_blocks
from tasks.core import config
from tasks.drain.migrate import migrate

POOL = "tapeline"
ROOT = Path(__file__).resolve().parent.parent
SILENT_AUTOMATION = "tapeline: crash silent flow runs"


def prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "prefect"
    return subprocess.run(
        [str(exe) if exe.exists() else "prefect", "--no-prompt", *args],
        env=env,
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=check,
    )


def ensure_pool(env: dict[str, str], pool: str) -> str:
    if prefect("work-pool", "inspect", pool, env=env, check=False).returncode == 0:
        return "exists"
    prefect("work-pool", "create", pool, "--type", "process", env=env)
    return "created"


def _crash_when_quiet(
    name: str,
    description: str,
    after: set[str],
    expect: set[str],
    within_s: int,
    message: str,
    match_related: dict[str, object] | None = None,
):
    """(Re)create an automation marking a flow run Crashed when, after one of ``after``,
    none of ``expect`` follows within ``within_s``: the run went quiet, its process is
    gone. Crashed ends the run, which frees a deployment concurrency slot it held."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    with suppress(ValueError):  # read raises when there is none yet
        Automation.read(name=name).delete()
    return Automation(
        name=name,
        description=description,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=match_related or {},
            after={f"prefect.flow-run.{e}" for e in after},
            expect={f"prefect.flow-run.{e}" for e in expect},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within_s,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
    ).create()


# Flow runs started by the platform's workers send a heartbeat every HEARTBEAT_S (Prefect's
# least; its default is 180); a run is silent after SILENT_S without one: ten missed, so a
# busy process, a slow server or a Prefect server down for up to ~4 minutes (a restart, an
# upgrade) is not called dead, and a dead one frees its deployment's slot within five
# minutes (the silent-run automation, or ``end_orphans``). The automation judges as soon as
# the server is back, before a live run's next heartbeat: at 150 s the soak's 2-minute
# outage had the drains and the ingestion ended and restarted, and trades went unstored
# for 40 s while the replacements started. Where the worker is on this host, a dead
# process is seen at once (``end_orphans(local_pids=True)``).
HEARTBEAT_S = 30
SILENT_S = 300


def ensure_silent_run_automation(missing_heartbeat_s: int = SILENT_S) -> None:
    """A self-hosted server marks nothing Crashed on its own: when a running flow run
    sends no heartbeat for ``missing_heartbeat_s``, this marks it Crashed, which fires the
    ingestion deployments' restart trigger (prefect.yaml)."""
    _crash_when_quiet(
        SILENT_AUTOMATION,
        "Mark flow runs Crashed when their heartbeat stops (zombie runs).",
        after={"heartbeat"},
        expect={"heartbeat", "Completed", "Failed", "Cancelled", "Crashed"},
        within_s=missing_heartbeat_s,
        message=f"No heartbeat for {missing_heartbeat_s} s: the process is gone.",
    )


# A worker proposes Pending ("Submitting"), which takes the deployment's concurrency slot,
# then starts the flow-run process, which proposes Running. A worker stopped in between
# (SIGTERM kills its flow-run process and leaves the run Pending; a lost container or
# machine takes both) leaves the run Pending with the slot held: every later run of a
# CANCEL_NEW deployment is Cancelled until the server reclaims the Pending lease (300 s by
# default), and the run stays Pending for good. The bound for "stuck", 75 s:
# - far above a normal start (Pending -> Running 6-12 s on 2 cores; drains under a heavy
#   soak: median 20-30 s, a tenth over 140 s). A run still starting after it is ended all
#   the same, and its process then runs anyway (the server accepts Crashed -> Running)
#   without the slot it released: one overlapping run, which the drains tolerate
#   (the stale writer is fenced by the offsets stored with the data);
# - a free slot within two schedule periods (120 s) of a worker being back: the run is
#   ended 2-6 s after the bound (proactive triggers are evaluated every 5 s; an overloaded
#   server was seen 15 s late), and a worker takes a run up to 10 s early (prefetch), so
#   the run after next finds the slot free;
# - well under the 300 s lease: ending a run whose lease the server already reclaimed
#   releases the slot a second time, and two runs could overlap.
STUCK_PENDING_S = 75
PENDING_AUTOMATION = "tapeline: crash flow runs stuck in Pending"
# Events are named after the state's name, not its type (prefect.states): Pending-type
# names, and every other name a run can take next (or a heartbeat: the process is alive).
PENDING_NAMES = ("Pending", "Submitting", "InfrastructurePending")
MOVED_ON_NAMES = (
    "Running", "Retrying", "Completed", "Failed", "TimedOut", "Crashed", "Cancelling",
    "Cancelled", "Paused", "Suspended", "Scheduled", "AwaitingRetry",
    "AwaitingConcurrencySlot", "Late", "heartbeat",
)  # fmt: skip


def ensure_stuck_pending_automation(
    deployment_ids: Iterable[UUID],
    pending_s: int = STUCK_PENDING_S,
    *,
    name: str = PENDING_AUTOMATION,
) -> UUID | None:
    """Mark a run of these deployments Crashed when it has been Pending for ``pending_s``
    with nothing after it (no Running, no end, no heartbeat): its worker is gone. Leaving
    Pending gives the deployment's concurrency slot back, so the next scheduled run runs
    instead of being Cancelled. Replaced when it exists; none without deployments.

    Only for deployments with a concurrency limit: there a stuck run blocks every later
    run. Elsewhere a slow start ended by mistake would cost more than it saves (a crashed
    ingestion run is restarted by its trigger while the slow one goes on)."""
    from prefect.automations import Automation

    ids = [f"prefect.deployment.{i}" for i in deployment_ids]
    if not ids:
        with suppress(ValueError):  # read raises when there is none
            Automation.read(name=name).delete()
        return None
    # A Pending-type state restarts the clock (a worker proposes Pending, then Submitting);
    # any other state or a heartbeat means the run moved on. Not a "prefect.flow-run.*"
    # wildcard: that also matches the pull-step events a flow-run process sends before it
    # is Running, and Submitting itself.
    automation = _crash_when_quiet(
        name,
        f"Mark runs Crashed that stay Pending for {pending_s} s (worker lost).",
        after=set(PENDING_NAMES),
        expect={*PENDING_NAMES, *MOVED_ON_NAMES},
        within_s=pending_s,
        message=f"Pending for {pending_s} s without starting: its worker is gone.",
        match_related={"prefect.resource.role": "deployment", "prefect.resource.id": ids},
    )
    return automation.id


def end_orphans(
    names: Iterable[str],
    pending_s: int = STUCK_PENDING_S,
    silent_s: int = SILENT_S,
    *,
    local_pids: bool = False,
) -> list[str]:
    """Mark Crashed the runs of these deployments that the automations' own rules call
    dead but that they never saw die: Pending for over ``pending_s``, or Running (or
    Cancelling) with no heartbeat for ``silent_s``. The automations react to events; a
    run whose worker died while the server was down, or before the automations existed
    (a stack stopped and started again), sends none, and would hold its deployment's
    concurrency slot for good. ``local_pids``: the runs' workers are on this host (the
    platform command's own worker), so a Running run whose process is gone is ended at
    once. Returns one line per run ended."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    now = datetime.now(UTC)
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        ids = [client.read_deployment_by_name(n).id for n in names]
        if not ids:
            return lines
        runs = live_runs(client, ids)
        for run in runs:
            since = run.state.timestamp if run.state and run.state.timestamp else now
            age = (now - since).total_seconds()
            if run.state_type == StateType.PENDING:
                if age < pending_s:
                    continue
                why = f"Pending for {age:.0f} s without starting: its worker is gone."
            elif local_pids and (run.infrastructure_pid or "").isdigit():
                # this host's runs: judged by their process, not by heartbeats the server
                # may have missed while it was down
                if not process_gone(run.infrastructure_pid):
                    continue
                why = f"{run.state_name} but its process {run.infrastructure_pid} is gone."
            else:
                if age < silent_s or _heartbeat_since(client, run.id, now - timedelta(0, silent_s)):
                    continue
                why = f"{run.state_name} with no heartbeat for {silent_s} s: the process is gone."
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            lines.append(f"ended orphaned run {run.name}: {why}")
        lines += _free_leaked_slots(client, names)
    return lines


def live_runs(client, deployment_ids: list[UUID]) -> list:
    """The deployments' runs that may hold a slot: Pending, Running or Cancelling."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    live = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=live))
        ),
    )


def due_runs(client, deployment_id: UUID, before) -> list:
    """The deployment's runs Scheduled (or Late) to start before ``before``."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterNextScheduledStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=before),
        ),
    )


def _free_leaked_slots(client, names: Iterable[str]) -> list[str]:
    """Give back deployment concurrency slots that no live run holds. A slot is held under
    a lease; a lease the server forgot (in-memory lease storage across a server restart)
    is never released, not even when its run ends, and the one-at-a-time deployment
    Cancels every later run for good. Slots are counted before the runs, so a run that
    takes a slot in between is counted as live, never freed."""
    lines = []
    for name in names:
        deployment = client.read_deployment_by_name(name)
        limit = deployment.global_concurrency_limit
        if limit is None or not limit.active_slots:
            continue
        live = live_runs(client, [deployment.id])
        leaked = limit.active_slots - len(live)
        if leaked > 0:
            client.release_concurrency_slots([limit.name], leaked, occupancy_seconds=1)
            lines.append(f"freed {leaked} concurrency slot(s) of {name} that no live run held")
    return lines


def process_gone(pid: str | None) -> bool:
    """Whether a process worker's flow-run process (``infrastructure_pid``) is gone from
    this host: no such pid, or one reused by something that is not a Prefect flow run."""
    if not pid or not pid.isdigit():
        return False  # not started yet, or not a local process: the other rules apply
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"prefect" not in cmdline


def _heartbeat_since(client, run_id: UUID, since) -> bool:
    """Whether the run sent a heartbeat (or any event) since ``since``."""
    answer = client.request(
        "POST",
        "/events/filter",
        json={
            "filter": {
                "occurred": {"since": since.isoformat()},
                "any_resource": {"id": [f"prefect.flow-run.{run_id}"]},
                "order": "DESC",
            },
            "limit": 1,
        },
    )
    return bool(answer.json().get("events"))


def concurrency_limited(names: Iterable[str]) -> list[UUID]:
    """Ids of the named deployments (``flow/deployment``) that have a concurrency limit."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = [client.read_deployment_by_name(n) for n in names]
    return [d.id for d in found if d.global_concurrency_limit is not None]


# Deployments an earlier version registered that prefect.yaml no longer has: `deploy`
# never deletes, and their schedules would go on creating runs beside their successors.
RETIRED = (
    "drain-prices/every-minute",  # now drain-prices/continuous
    "drain-transactions/every-minute",  # now drain-transactions/continuous
)


def retire(names: Iterable[str]) -> list[str]:
    """Delete these deployments where they exist (their runs' history stays)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    gone = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            client.delete_deployment(deployment.id)
            gone.append(name)
    return gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__)
    parser.add_argument("--pool", default=POOL)
    settings = config.load()
    parser.add_argument("--code-dir", default=str(settings.code_dir))
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "TAPELINE_CODE_DIR": args.code_dir,
        "TAPELINE_SIMULATOR_URL": settings.simulator_url,
        **settings.prefect_env(),
    }
    if settings.pg_dsn != settings.pg_writer_dsn:  # the owner is ours: bring the schema up
        applied = migrate(settings.pg_dsn, "public")
        print(f"postgres schema public: up to date ({len(applied)} migrations applied now)")
    print(f"work pool {args.pool}: {ensure_pool(env, args.pool)}")
    with prefect_api(settings):
        return _register(env)


def _register(env: dict[str, str]) -> int:
    register_blocks(["register"])
    deployed = prefect("deploy", "--all", env=env, check=False)
    if deployed.returncode != 0:
        print(deployed.stdout[-4000:], deployed.stderr[-4000:], file=sys.stderr)
        return deployed.returncode
    names = [ln.split("'")[1] for ln in deployed.stdout.splitlines() if "Deployment '" in ln]
    for name in names:
        print(f"deployed {name}")
    for name in retire(RETIRED):
        print(f"removed {name} (replaced; see RETIRED)")
    ensure_silent_run_automation()
    print(f"automation '{SILENT_AUTOMATION}' in place")
    limited = concurrency_limited(names)
    ensure_stuck_pending_automation(limited)
    print(f"automation '{PENDING_AUTOMATION}' in place for {len(limited)} deployments")
    for line in end_orphans(names):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
