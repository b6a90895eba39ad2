"""The drain flows under the local Prefect server: a summary and a table artifact."""

from __future__ import annotations

import asyncio
import uuid

from tests.drain.support import books, pg_schema, publish, quotes, trades, transactions


def _artifact(key: str, state):
    """The artifact ``key`` of the flow run that ended in ``state`` (scheduled drains on
    the same server publish the same keys)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                )
            )
            return found[0] if found else None

    return asyncio.run(read())


def test_drain_flows_run_on_the_server_and_leave_an_artifact(
    prefect_server, kafka, postgres, mongo_db, new_topic
):
    from flows.drain import drain_prices, drain_transactions

    t_topic, q_topic, x_topic = new_topic(2), new_topic(1), new_topic(2)
    b_topic = new_topic(1)
    publish(kafka, t_topic, [*trades(500), (b"k", b"junk")])
    publish(kafka, q_topic, quotes(50))
    publish(kafka, b_topic, books(10))  # 2 snapshots, 8 deltas
    publish(kafka, x_topic, transactions(users=5, n=200))
    with pg_schema(postgres.pg_dsn) as schema:
        prices_state = drain_prices(
            trades_topic=t_topic,
            quotes_topic=q_topic,
            books_topic=b_topic,
            consumer=f"test-flow-{uuid.uuid4().hex[:8]}",
            schema=schema,
            max_seconds=20,
            return_state=True,
        )
    prices = prices_state.result()
    assert prices["stopped"] == "caught up"
    assert prices["rows"] == {
        "trades": 500, "quotes": 50, "quotes_latest": 3, "book_snapshots": 2
    }  # fmt: skip
    assert prices["skipped"] == {"book_deltas": 8}
    assert prices["rejects"] == {t_topic: 1}
    assert prices["lag"] == {t_topic: 0, q_topic: 0, b_topic: 0}

    txs_state = drain_transactions(
        topic=x_topic,
        consumer=f"test-flow-{uuid.uuid4().hex[:8]}",
        database=mongo_db.name,
        max_seconds=20,
        return_state=True,
    )
    txs = txs_state.result()
    assert txs["stopped"] == "caught up"
    assert txs["rows"]["transactions"] == 205
    assert txs["lag"] == {x_topic: 0}

    artifact = _artifact("drain-prices", prices_state)
    assert artifact is not None and artifact.type == "table"
    assert t_topic in str(artifact.data) and "trades" in str(artifact.data)
    artifact = _artifact("drain-transactions", txs_state)
    assert artifact is not None and x_topic in str(artifact.data)
