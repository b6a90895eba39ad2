"""Tiny flows for tests/test_schedules.py, run by a real process worker from this checkout.

``tick`` does nothing; ``SCHEDULES_TEST_HOLD_S`` (a run's job-variable env) makes its
flow-run process sleep before the flow is loaded, i.e. while the run is still Pending:
a flow-run process that cannot start quickly. ``fail_once`` fails its first attempt and
succeeds on the retry.
"""

from __future__ import annotations

import os
import time

from prefect import flow
from prefect.runtime import flow_run

time.sleep(float(os.environ.get("SCHEDULES_TEST_HOLD_S", "0")))


@flow(name="tapeline-test-tick")
def tick() -> str:
    return "tick"


@flow(name="tapeline-test-fail-once", retries=1, retry_delay_seconds=5)
def fail_once() -> int:
    attempt = flow_run.run_count
    if attempt < 2:
        raise RuntimeError(f"attempt {attempt} fails on purpose")
    return attempt
