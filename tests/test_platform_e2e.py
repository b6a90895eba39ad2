"""End to end under the local Prefect server: the README's main command for 90 s, then a
backfill deployment run, checked through Prefect's own run history and artifacts.

The platform command registers the pool, blocks and deployments (`prefect deploy --all`),
starts a worker, the simulator and the trading simulator, runs ingestion and lets the
scheduled drains and aggregation work; on exit it cancels the long runs, drains the rest
and verifies that every trade id the simulator sent is stored once with no hole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from deployments import local
from tasks.core import config

pytestmark = pytest.mark.services


def _runs(client, deployment: str):
    """Runs of a deployment that have started (the scheduler also holds many future ones)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    name = deployment.split("/")[1]
    dep = client.read_deployment_by_name(deployment)
    assert dep.name == name
    started = [StateType.RUNNING, StateType.COMPLETED, StateType.CANCELLED, StateType.CANCELLING,
               StateType.FAILED, StateType.CRASHED]  # fmt: skip
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=started))
        ),
        limit=200,
    )


def test_main_command_runs_the_platform_without_loss(kafka, postgres, mongo, prefect_server):
    settings = config.load()
    started = datetime.now(UTC)
    env = {**os.environ, "TAPELINE_SIMULATOR_RATE": "100", "PREFECT_API_URL": prefect_server}
    try:
        out = subprocess.run(
            [
                sys.executable, "-m", "deployments.platform", "--minutes", "1.5", "--every", "10",
                "--keep",
            ],
            env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "zero loss" in out.stdout
        assert "in: trades" in out.stdout  # the live summary printed

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
        from prefect.deployments import run_deployment

        end = datetime.now(UTC).replace(second=0, microsecond=0)
        backfill = run_deployment(
            "backfill-trades/adhoc",
            parameters={
                "venue": "binance", "symbols": ["BTC-USDT"],
                "start": (end - timedelta(minutes=1)).isoformat(), "end": end.isoformat(),
                "simulator_url": settings.simulator_url, "wait_for_drain_s": 5.0,
                "rebuild": False,
            },
            timeout=180, as_subflow=False,
        )  # fmt: skip
        assert backfill.state is not None and backfill.state.is_completed(), backfill.state

        with get_client(sync_client=True) as client:
            ingest = [r for r in _runs(client, "ingest/simulator-feed") if r.created >= started]
            assert ingest and all(r.state.is_cancelled() for r in ingest), ingest
            for name in ("drain-prices/continuous", "drain-transactions/continuous"):
                done = [r for r in _runs(client, name) if r.created >= started]
                assert any(r.state.is_completed() for r in done), name
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in done])
                    )
                )
                assert artifacts, f"{name} left no artifact"
            assert client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[backfill.id])
                )
            ), "backfill left no artifact"
    finally:
        for side in local.sides(settings, [], simulate=True):
            side.down(settings.home)
