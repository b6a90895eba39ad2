"""Schedules that survive a dead worker, against the local stack's Prefect server.

A worker proposes Pending for a run (taking its deployment's concurrency slot) before it
starts the flow-run process. When the worker dies in between, the run stays Pending, the
slot stays taken, and every later run of a one-at-a-time (CANCEL_NEW) deployment is
Cancelled. ``deployments.setup.ensure_stuck_pending_automation`` ends such a run; here it
runs with a short bound, scoped to this test's own deployment.

Everything lives in a uniquely named work pool with two queues: worker A (queue ``a``) is
killed while its run is Pending; worker B (queue ``b``) stands for the worker once it is
back. Runs are real flow runs of ``tests/schedules_flow.py`` started by real process
workers. Waits are liveness bounds, not speed targets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
PENDING_S = 45  # the test automation's bound (production: deployments.setup.STUCK_PENDING_S)
HOLD_S = 900  # the stuck run's flow-run process sleeps this long before loading its flow


def wait_for(what: str, probe: Callable[[], Any], bound_s: float, every_s: float = 1.0) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + bound_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"waited {bound_s:.0f} s for {what}", pytrace=False)
        time.sleep(every_s)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the flow-run process runs in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Sandbox:
    """A work pool with queues ``a`` and ``b``, deployments in it, workers on it, and
    queue ``idle`` that no worker polls: a run the test moves by hand stays its own."""

    def __init__(self, client, tag: str, logs: Path) -> None:
        from prefect.client.schemas.actions import WorkPoolCreate

        self.client, self.tag, self.logs = client, tag, logs
        self.pool = f"tapeline-test-{tag}"
        client.create_work_pool(WorkPoolCreate(name=self.pool, type="process"))
        for queue in ("a", "b", "idle"):
            client.create_work_queue(name=queue, work_pool_name=self.pool)
        self.deployments: list = []
        self.workers: dict[str, subprocess.Popen] = {}

    def deploy(self, entrypoint: str, flow_name: str) -> Any:
        """A deployment of a flow of tests/schedules_flow.py, one run at a time, CANCEL_NEW
        (the drains' setting in prefect.yaml), on queue ``b`` unless a run says otherwise."""
        from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

        flow_id = self.client.create_flow_from_name(flow_name)
        deployment_id = self.client.create_deployment(
            flow_id=flow_id,
            name=self.tag,
            work_pool_name=self.pool,
            work_queue_name="b",
            entrypoint=entrypoint,
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ],
            concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(
                collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        )
        if deployment_id not in self.deployments:  # the same flow and name is an upsert
            self.deployments.append(deployment_id)
        return deployment_id

    def start_worker(self, queue: str) -> subprocess.Popen:
        """A process worker on one queue, polling every 2 s; returns once the server
        lists it."""
        name = f"{self.pool}-{queue}"
        exe = Path(sys.executable).parent / "prefect"
        log = (self.logs / f"worker-{queue}.log").open("ab")
        proc = subprocess.Popen(
            [str(exe), "worker", "start", "--pool", self.pool, "--work-queue", queue,
             "--type", "process", "--name", name],
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.workers[queue] = proc
        wait_for(
            f"worker {name} to report to the server (log: {log.name})",
            lambda: (
                proc.poll() is None
                and any(w.name == name for w in self.client.read_workers_for_work_pool(self.pool))
            ),
            120,
        )
        return proc

    def run(self, deployment_id, queue: str = "b", **env: str):
        return self.client.create_flow_run_from_deployment(
            deployment_id, work_queue_name=queue, job_variables={"env": env} if env else None
        ).id

    def state(self, run_id):
        return self.client.read_flow_run(run_id).state

    def history(self, run_id) -> list[str]:
        """The run's states in order, by name, with their messages."""
        return [
            f"{s.name}{': ' + s.message if s.message else ''}"
            for s in self.client.read_flow_run_states(run_id)
        ]

    def names(self, run_id) -> list[str]:
        return [s.name for s in self.client.read_flow_run_states(run_id)]

    def final(self, run_id, bound_s: float, what: str):
        return wait_for(
            f"{what} (states so far: {self.history(run_id)})",
            lambda: (s := self.state(run_id)) is not None and s.is_final() and s,
            bound_s,
        )

    def active_slots(self, deployment_id) -> int:
        limit = self.client.read_deployment(deployment_id).global_concurrency_limit
        assert limit is not None
        return limit.active_slots

    def close(self) -> None:
        from prefect.client.schemas.filters import DeploymentFilter
        from prefect.states import Crashed

        for proc in self.workers.values():
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    _kill(pid, signal.SIGKILL)
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.deployments:  # nothing of ours left Pending or Running on the server
            runs = self.client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": self.deployments}), limit=200
            )
            for fr in runs:
                if fr.state is not None and not fr.state.is_final():
                    self.client.set_flow_run_state(
                        fr.id, Crashed(message="test cleanup"), force=True
                    )
        for deployment_id in self.deployments:
            self.client.delete_deployment(deployment_id)
        self.client.delete_work_pool(self.pool)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@pytest.fixture(scope="module")
def sandbox(prefect_server, tmp_path_factory) -> Iterator[Sandbox]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        box = Sandbox(client, uuid.uuid4().hex[:10], tmp_path_factory.mktemp("workers"))
        try:
            yield box
        finally:
            box.close()


def test_a_run_left_pending_by_a_killed_worker_is_ended_and_frees_the_slot(sandbox):
    from prefect.automations import Automation

    from deployments.setup import ensure_stuck_pending_automation

    deployment = sandbox.deploy("tests/schedules_flow.py:tick", "tapeline-test-tick")
    automation = ensure_stuck_pending_automation(
        [deployment], PENDING_S, name=f"tapeline-test: stuck Pending {sandbox.tag}"
    )
    try:
        worker_b = sandbox.start_worker("b")  # the worker once it is back
        worker_a = sandbox.start_worker("a")  # the worker that dies

        # Worker A takes the run (Pending: the slot is taken) and starts its flow-run
        # process, which cannot start quickly; then A and that process are killed.
        stuck = sandbox.run(deployment, queue="a", SCHEDULES_TEST_HOLD_S=str(HOLD_S))
        wait_for(
            "worker A to start the stuck run's flow-run process",
            lambda: any("prefect.engine" in cmdline(p) for p in descendants(worker_a.pid)),
            120,
        )
        assert sandbox.state(stuck).is_pending(), sandbox.history(stuck)
        flow_run_processes = descendants(worker_a.pid)
        worker_a.send_signal(signal.SIGKILL)
        worker_a.wait()
        for pid in flow_run_processes:
            _kill(pid, signal.SIGKILL)
        wait_for(
            "the stuck run's flow-run process to be gone",
            lambda: not any(alive(p) for p in flow_run_processes),
            30,
        )
        assert sandbox.state(stuck).is_pending(), (
            f"the run left Pending before its worker was killed; states: {sandbox.history(stuck)}"
        )
        assert sandbox.active_slots(deployment) == 1

        # The problem: the next run finds the slot taken and is Cancelled.
        blocked = sandbox.run(deployment)
        state = sandbox.final(blocked, 120, "worker B to try the next run")
        assert state.is_cancelled(), sandbox.history(blocked)
        assert "concurrency limit" in (state.message or ""), sandbox.history(blocked)

        # The fix: the automation ends the stuck run and the slot is given back.
        bound = PENDING_S + 120
        state = sandbox.final(
            stuck, bound, f"the automation to end the run left Pending (bound {PENDING_S} s)"
        )
        assert state.is_crashed(), sandbox.history(stuck)
        assert "its worker is gone" in (state.message or ""), sandbox.history(stuck)
        wait_for(
            "the deployment's concurrency slot to be released",
            lambda: sandbox.active_slots(deployment) == 0,
            30,
        )

        # A later run of the deployment now runs instead of being Cancelled.
        later = sandbox.run(deployment)
        state = sandbox.final(later, 180, "worker B to run the later run to its end")
        assert state.is_completed(), sandbox.history(later)
        assert "Running" in sandbox.names(later), sandbox.history(later)
        assert worker_b.poll() is None
    finally:
        if automation is not None:
            Automation.read(id=automation).delete()


def test_a_flow_retry_runs_again_under_a_deployment_concurrency_limit(sandbox):
    """``fail_once`` (retries=1, like the drains) fails its first attempt in a deployment
    with concurrency limit 1: the run goes AwaitingRetry, runs again in the same process
    and completes; it is not ended Crashed, and its slot is released at the end."""
    deployment = sandbox.deploy("tests/schedules_flow.py:fail_once", "tapeline-test-fail-once")
    if "b" not in sandbox.workers or sandbox.workers["b"].poll() is not None:
        sandbox.start_worker("b")
    run = sandbox.run(deployment)
    state = sandbox.final(run, 180, "the flow run with one retry to end")
    history, names = sandbox.history(run), sandbox.names(run)
    assert state.is_completed(), history
    assert sandbox.client.read_flow_run(run).run_count == 2, history
    assert "AwaitingRetry" in names, history
    assert "Crashed" not in names, history
    assert names.count("Running") == 2, history
    assert sandbox.active_slots(deployment) == 0


def test_runs_orphaned_before_the_automations_existed_are_ended_at_setup(sandbox):
    """A stack stopped with runs Pending and Running, then started again: no event will
    ever fire the automations for them. ``end_orphans`` (run by ``deployments.setup``)
    ends them by the automations' own rules, which frees the slot; live runs are kept."""
    from prefect.states import Pending, Running

    from deployments.setup import end_orphans

    pending_dep = sandbox.deploy("tests/schedules_flow.py:tick", "tapeline-test-tick")
    running_dep = sandbox.deploy("tests/schedules_flow.py:fail_once", "tapeline-test-fail-once")
    names = [f"tapeline-test-tick/{sandbox.tag}", f"tapeline-test-fail-once/{sandbox.tag}"]
    stuck = sandbox.run(pending_dep, queue="idle")
    silent = sandbox.run(running_dep, queue="idle")
    sandbox.client.set_flow_run_state(stuck, Pending())
    sandbox.client.set_flow_run_state(silent, Pending())
    sandbox.client.set_flow_run_state(silent, Running())
    assert sandbox.active_slots(pending_dep) == 1 and sandbox.active_slots(running_dep) == 1

    # With the production bounds both are too young to call dead: nothing is ended.
    assert end_orphans(names) == []
    assert sandbox.state(stuck).is_pending() and sandbox.state(silent).is_running()

    # Past the bounds (here 0 s), both are ended, their slots free.
    ended = end_orphans(names, pending_s=0, silent_s=0)
    assert len(ended) == 2, ended
    assert sandbox.state(stuck).is_crashed(), sandbox.history(stuck)
    assert sandbox.state(silent).is_crashed(), sandbox.history(silent)
    assert sandbox.active_slots(pending_dep) == 0 and sandbox.active_slots(running_dep) == 0


def test_a_slot_no_live_run_holds_is_given_back(sandbox):
    """A deployment slot taken under a lease the server forgot (in-memory leases across a
    server restart) is never released by its run; ``end_orphans`` gives it back, and a
    slot a live run holds is kept."""
    from prefect.states import Pending

    from deployments.setup import end_orphans

    deployment = sandbox.deploy("tests/schedules_flow.py:tick", "tapeline-test-tick")
    name = f"tapeline-test-tick/{sandbox.tag}"
    limit = sandbox.client.read_deployment(deployment).global_concurrency_limit
    sandbox.client.increment_concurrency_slots([limit.name], slots=1, mode="concurrency")
    assert sandbox.active_slots(deployment) == 1  # held by no run: leaked

    assert end_orphans([name]) == [f"freed 1 concurrency slot(s) of {name} that no live run held"]
    assert sandbox.active_slots(deployment) == 0

    live = sandbox.run(deployment, queue="idle")
    sandbox.client.set_flow_run_state(live, Pending())
    assert sandbox.active_slots(deployment) == 1
    assert end_orphans([name]) == []  # a young Pending run holds it: kept
    assert sandbox.active_slots(deployment) == 1


def test_a_running_run_whose_local_process_is_gone_is_ended_at_once(sandbox):
    """The platform command's worker runs on its own host: a Running run whose flow-run
    process no longer exists is ended on the next check, not after the silent window;
    one whose process lives is kept, however long the server has had no heartbeat from it
    (after an outage the server missed them, the process did not stop)."""
    from prefect.states import Pending, Running

    from deployments.setup import end_orphans

    deployment = sandbox.deploy("tests/schedules_flow.py:fail_once", "tapeline-test-fail-once")
    name = f"tapeline-test-fail-once/{sandbox.tag}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = sandbox.run(deployment, queue="idle")
    sandbox.client.set_flow_run_state(run, Pending())
    sandbox.client.set_flow_run_state(run, Running())
    standin = subprocess.Popen(  # a live flow-run process, as far as its command line says
        [sys.executable, "-c", "import time; time.sleep(300)", "prefect.engine stand-in"]
    )
    try:
        sandbox.client.update_flow_run(run, infrastructure_pid=str(standin.pid))
        assert end_orphans([name], local_pids=True) == []
        assert end_orphans([name], silent_s=0, local_pids=True) == []
    finally:
        standin.kill()
        standin.wait()
    sandbox.client.update_flow_run(run, infrastructure_pid=str(gone.pid))
    ended = end_orphans([name], local_pids=True)
    assert ended == [f"ended orphaned run {sandbox.client.read_flow_run(run).name}: Running"
                     f" but its process {gone.pid} is gone."]  # fmt: skip
    assert sandbox.state(run).is_crashed() and sandbox.active_slots(deployment) == 0


def test_a_drain_whose_only_run_stays_pending_gets_a_reader(sandbox, monkeypatch):
    """A run Pending past the grace (its worker may be gone) does not count as the
    drain's reader: the reaper starts one, rather than leave the topics unread until the
    stuck run is ended at 75 s. A Pending run within the grace does count."""
    from prefect.states import Pending

    from deployments import reaper

    deployment = sandbox.deploy("tests/schedules_flow.py:tick", "tapeline-test-tick")
    name = f"tapeline-test-tick/{sandbox.tag}"
    stuck = sandbox.run(deployment, queue="idle")
    # forced: the run stands for one a worker took, whatever the deployment's slot says
    # (proposed, it was once Cancelled "concurrency limit reached" on a loaded CI machine)
    sandbox.client.set_flow_run_state(stuck, Pending(), force=True)
    assert sandbox.state(stuck).is_pending(), sandbox.history(stuck)
    assert reaper.keep_following((name,)) == []  # within the 30 s grace: it is coming

    monkeypatch.setattr(reaper, "PENDING_GRACE_S", 0.0)
    lines = reaper.keep_following((name,))
    assert len(lines) == 1 and lines[0].startswith("started following run "), lines
    assert lines[0].endswith(f"of {name}: it had none live"), lines
    assert sandbox.state(stuck).is_pending(), sandbox.history(stuck)


def test_the_reaper_service_reports_each_round_and_stops_on_sigterm(prefect_server, tmp_path):
    """Compose's ``reaper`` service: a round every ``--every`` s touches the file its
    health check reads, a deployment the server does not have is a skipped round (not an
    exit), and SIGTERM ends it cleanly. (Deployments of its own: the real ones may be
    registered on this server, and it would start drain runs of them.)"""
    alive = tmp_path / "alive"
    missing = f"test-reaper-{uuid.uuid4().hex[:8]}/none"
    command = [
        sys.executable, "-m", "deployments.reaper", "--every", "1",
        "--alive-file", str(alive), "--drains", missing, "--others", missing,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = wait_for("a first round", lambda: alive.exists() and alive.stat().st_mtime, 120)
        wait_for("a second round", lambda: alive.stat().st_mtime > first, 60, every_s=0.2)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)  # liveness: a round under way ends first
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "orphan check skipped" in out, out[-2000:]
