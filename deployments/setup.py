"""Register everything a Prefect environment needs to run Tapeline's deployments.

    python -m deployments.setup            # local stack: pool, blocks, deployments, automation
    TAPELINE_CODE_DIR=/app python -m deployments.setup    # what the compose worker runs

Idempotent: the work pool is created only when missing, blocks and deployments are
overwritten with the current settings, the automation is replaced. The deployments
themselves live in prefect.yaml; this only prepares the ground and calls
``prefect --no-prompt deploy --all`` (which fails when the pool does not exist).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.__main__ import main as register_blocks
from tasks.core import config

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


def ensure_silent_run_automation(missing_heartbeat_s: int = 600) -> None:
    """A self-hosted server marks nothing Crashed on its own: when a running flow run
    sends no heartbeat for ``missing_heartbeat_s``, this marks it Crashed, which fires the
    ingestion deployments' restart trigger (prefect.yaml)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    with suppress(ValueError):  # read raises when there is none yet
        Automation.read(name=SILENT_AUTOMATION).delete()
    Automation(
        name=SILENT_AUTOMATION,
        description="Mark flow runs Crashed when their heartbeat stops (zombie runs).",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=missing_heartbeat_s,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {missing_heartbeat_s} s: the process is gone.",
            )
        ],
    ).create()


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
        "PREFECT_API_URL": settings.prefect_api_url,
    }
    print(f"work pool {args.pool}: {ensure_pool(env, args.pool)}")
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
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
    ensure_silent_run_automation()
    print(f"automation '{SILENT_AUTOMATION}' in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
