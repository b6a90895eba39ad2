"""The trading-activity simulator against real Kafka, drained into the MongoDB server."""

from __future__ import annotations

import uuid

from flows.drain import drain_transactions
from flows.trading import trading_activity
from tasks.core.wallets import fold_transactions, wallet_balances


def test_simulated_fills_drain_into_balances_that_never_go_negative(
    kafka, postgres, mongo_db, new_topic, prefect_server
):
    topic = new_topic(partitions=3)
    sent = trading_activity(users=5, rate_per_s=200, run_seconds=2, seed=11, topic=topic)
    assert sent["deposit"] == 5  # one USDT deposit per user
    assert sent["filled"] > 20

    summary = drain_transactions(
        topic=topic, consumer=f"test-trading-{uuid.uuid4().hex[:8]}",
        database=mongo_db.name, max_seconds=30,
    )  # fmt: skip
    assert mongo_db.transactions.count_documents({}) == sum(sent.values()), summary
    balances = wallet_balances(mongo_db)
    assert balances == fold_transactions(mongo_db)
    assert balances and min(balances.values()) >= 0
    assert {w.split(":")[1] for w in balances} >= {"USDT", "BTC"}


def test_a_run_the_server_ended_stops_sending(
    kafka, postgres, new_topic, prefect_server, monkeypatch
):
    """After a Prefect server outage longer than the silent-run window the automation ends
    a live trading run Crashed and its trigger starts a replacement: the ended run must
    stop sending, or the users' activity doubles."""
    import threading
    import time

    from prefect import tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Crashed

    import flows.common

    monkeypatch.setattr(flows.common, "ENDED_CHECK_S", 1.0)
    topic, tag = new_topic(partitions=1), f"test-ended-{uuid.uuid4().hex[:8]}"
    out: dict = {}

    def run() -> None:
        with tags(tag):
            out["sent"] = trading_activity(users=2, rate_per_s=20, run_seconds=600, topic=topic)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        runs = []
        while not runs and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
            )
        assert runs, "the trading run never showed up on the server (waited 60 s)"
        time.sleep(3)  # let it send a little first
        client.set_flow_run_state(runs[0].id, Crashed(message="test: declared dead"), force=True)
    t.join(60)
    assert not t.is_alive(), "the ended run still sent 60 s after the server ended it"
