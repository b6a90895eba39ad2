"""The backstop that keeps the scheduled drains reading when a worker or run is lost.

    python -m deployments.reaper             # every 15 s until stopped (compose's `reaper`)

Each round ends the scheduled deployments' runs a dead worker left behind, by the
automations' own rules (``deployments.setup.end_orphans``), then starts a following run of
each drain that has none (``keep_following``). The automations and the restart triggers
do both first; this is for what they cannot see: a firing whose action failed while the
Prefect server's database was restarting, and a Crashed event the server's trigger
service holds back (``keep_following``). The platform command runs a round every 15 s
itself (with its worker's pids at hand); compose runs this module as its own service.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from blocks import prefect_api
from deployments import setup as deployment_setup
from tasks.core import config

DRAINS = ("drain-prices/continuous", "drain-transactions/continuous")
AGGREGATE = "aggregate/every-minute"

# How often to look for dead runs and drains nobody runs: the check is cheap, and it
# bounds how long the topics go unread after a worker or run is lost.
REAP_EVERY_S = 15.0
# A drain run still Pending after this long does not count as the drain's reader: its
# worker may be gone (it is ended as an orphan only at STUCK_PENDING_S, 75 s). A start
# takes 6-12 s on 2 cores, 20-30 s under the soak's load; a slow one that does start
# meanwhile just hands over to (or takes over from) the extra run.
PENDING_GRACE_S = 30.0


def run_deployment(name: str, wait_s: float = 0, **parameters: Any):
    from prefect.deployments import run_deployment as run

    return run(name, parameters=parameters or None, timeout=wait_s, as_subflow=False)


def reap(
    *,
    local_pids: bool = False,
    drains: tuple[str, ...] = DRAINS,
    others: tuple[str, ...] = (AGGREGATE,),
) -> list[str]:
    """One round over the deployments ``drains`` (ended runs, then following runs) and
    ``others`` (ended runs); returns a line per run ended or started. ``local_pids``: the
    worker runs on this host, so a Running run whose process is gone is ended at once
    (else after the silent-run window without a heartbeat)."""

    def end_orphans() -> list[str]:
        return deployment_setup.end_orphans([*drains, *others], local_pids=local_pids)

    def keep_drains_following() -> list[str]:
        return keep_following(drains)

    lines: list[str] = []
    for step in (end_orphans, keep_drains_following):
        try:
            lines += step()
        except Exception as e:  # the server may be down right now; the next round retries
            lines.append(f"orphan check skipped: {type(e).__name__}: {e}")
            break
    return lines


_NOT_RESTARTED: set = set()  # Failed runs already reported by keep_following


def keep_following(drains: tuple[str, ...] = DRAINS) -> list[str]:
    """Start a following run of each drain that has no run Running, none Pending for
    less than ``PENDING_GRACE_S`` and none due within 45 s (a retry is due 30 s after a
    failed attempt), unless its last run Failed: that one is left to the next schedule,
    so a drain that cannot start (a schema behind the code, say) is not restarted every
    round.

    A Pending run whose worker died would hold off a reader until it is ended as an
    orphan (75 s): in the soak, a worker killed while submitting a price drain left the
    topic unread for two minutes. Past the grace a Pending run no longer counts; the
    deployment's limit (two runs) still leaves room for the new one.

    The restart-when-Crashed triggers cannot be relied on alone. Prefect's trigger service
    handles a run's state events in order: an event whose predecessor it has not seen is
    held for up to 15 minutes. A scheduled run's first Pending event follows a Scheduled
    event the scheduler never sends, and a server restart forgets what was seen; in the
    soak, two Crashed drains were never replaced by their trigger, and the price drain read
    nothing for 6 minutes. A run started here while the trigger's own run also starts is
    harmless: the newer takes over, and the deployment's limit Cancels a third."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterEndTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    lines = []
    with get_client(sync_client=True) as client:
        now = datetime.now(UTC)
        soon = now + timedelta(seconds=45)
        for name in drains:
            deployment = client.read_deployment_by_name(name)
            if any(
                _reading(run, now) for run in deployment_setup.live_runs(client, [deployment.id])
            ):
                continue
            if deployment_setup.due_runs(client, deployment.id, soon):
                continue
            last = client.read_flow_runs(  # ended runs only: PostgreSQL sorts NULLs first
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(end_time=FlowRunFilterEndTime(is_null_=False)),
                sort=FlowRunSort.END_TIME_DESC,
                limit=1,
            )
            if last and last[0].state and last[0].state.is_failed():
                if last[0].id not in _NOT_RESTARTED:
                    _NOT_RESTARTED.add(last[0].id)
                    lines.append(
                        f"{name}: not restarted, its last run {last[0].name} Failed"
                        f" ({(last[0].state.message or '')[:120]}); the next schedule tries"
                    )
                continue
            run = run_deployment(name)
            lines.append(f"started following run {run.name} of {name}: it had none live")
    return lines


def _reading(run: Any, now: datetime) -> bool:
    """Whether ``run`` reads the drain's topics, or will soon: Running, or Pending for
    less than ``PENDING_GRACE_S``. A Cancelling run is on its way out."""
    from prefect.client.schemas.objects import StateType

    if run.state_type == StateType.RUNNING:
        return True
    if run.state_type != StateType.PENDING:
        return False
    since = run.state.timestamp if run.state and run.state.timestamp else now
    return (now - since).total_seconds() < PENDING_GRACE_S


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.reaper", description=__doc__)
    p.add_argument("--every", type=float, default=REAP_EVERY_S, help="seconds between rounds")
    p.add_argument(
        "--alive-file",
        type=Path,
        help="touched after every round (the container's health check reads its age)",
    )
    p.add_argument("--drains", default=",".join(DRAINS), help="deployments kept following")
    p.add_argument("--others", default=AGGREGATE, help="deployments whose dead runs are ended")
    args = p.parse_args(argv)
    drains = tuple(n for n in args.drains.split(",") if n)
    others = tuple(n for n in args.others.split(",") if n)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    settings = config.load()
    with prefect_api(settings):
        while not stop["now"]:
            for line in reap(drains=drains, others=others):
                print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            if args.alive_file is not None:
                args.alive_file.touch()
            deadline = time.monotonic() + args.every
            while not stop["now"] and time.monotonic() < deadline:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
