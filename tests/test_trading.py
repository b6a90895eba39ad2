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
