"""Following drains hand over without a gap: the scheduled drains' succession, against the
real Kafka, PostgreSQL and FerretDB.

A scheduled run follows its topics (keeps reading once caught up); the next run starts
while it reads, takes over once positioned, and the older run stops ("handed over").
Records published steadily through the handover are stored once, and the stored count
never stands still for long while records wait.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tasks.core.pg import connect
from tasks.core.wallets import wallet_balances
from tests.drain.support import (
    drain_prices_now,
    drain_transactions_now,
    expected_balances,
    pg_schema,
    prices_sink,
    publish,
    trades,
    transactions,
)

# Its own topics, schemas and databases: scripts/test.sh runs it in the second process.
pytestmark = pytest.mark.beside

GAP_BOUND_S = 10.0  # the bound on a drain idle with records waiting
LIVENESS_S = 120.0  # how long any step may take on a loaded machine


class Steady(threading.Thread):
    """Publishes ``items`` in small slices, one slice every 0.1 s."""

    def __init__(self, settings, topic: str, items: list, per_slice: int):
        super().__init__(daemon=True)
        self.settings, self.topic, self.items, self.per_slice = settings, topic, items, per_slice
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(0, len(self.items), self.per_slice):
                publish(self.settings, self.topic, self.items[i : i + self.per_slice])
                time.sleep(0.1)
        except BaseException as e:  # reported by the test
            self.error = e


def _follow(results: dict, key: str, run: Callable) -> threading.Thread:
    def target() -> None:
        try:
            results[key] = run()
        except BaseException as e:
            results[key] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _wait_for(results: dict, key: str) -> None:
    deadline = time.monotonic() + LIVENESS_S
    while key not in results:
        assert time.monotonic() < deadline, f"the {key} run did not stop when taken over"
        time.sleep(0.2)


def _watch_handover(
    stored: Callable[[], int], total: int, producer: Steady, started: Callable[[], object]
) -> tuple[float, list[str]]:
    """Poll the stored count until every record is stored: returns the longest stretch in
    which records waited (published, not stored) and the count did not move, and notes."""
    deadline = time.monotonic() + LIVENESS_S
    last, moved_at, longest, notes = -1, time.monotonic(), 0.0, []
    second = None
    while True:
        n = stored()
        now = time.monotonic()
        if n != last:
            last, moved_at = n, now
        elif n < total:
            longest = max(longest, now - moved_at)
        if n >= total and not producer.is_alive():
            return longest, notes
        if second is None and n >= total // 4:
            second = started()
            notes.append(f"second run started at {n} of {total} stored")
        assert now < deadline, f"{n} of {total} stored after {LIVENESS_S:.0f} s"
        time.sleep(0.05)


def test_a_following_price_drain_hands_over_without_a_gap(kafka, postgres, new_topic):
    t_topic, q_topic = new_topic(3), new_topic(1)
    items = trades(12_000)
    consumer = f"test-follow-{uuid.uuid4().hex[:8]}"
    results: dict = {}
    with pg_schema(postgres.pg_dsn) as schema:

        def stored() -> int:
            with contextlib.closing(connect(postgres.pg_dsn, schema)) as c, c.cursor() as cur:
                cur.execute("SELECT count(*) FROM trades")
                return cur.fetchone()[0]

        def run() -> object:
            return drain_prices_now(
                kafka, schema, consumer, [t_topic, q_topic], follow=True, max_seconds=300
            )

        producer = Steady(kafka, t_topic, items, per_slice=100)
        first = _follow(results, "first", run)
        producer.start()
        longest, notes = _watch_handover(
            stored, len(items), producer, lambda: _follow(results, "second", run)
        )
        assert producer.error is None, producer.error
        first.join(LIVENESS_S)
        assert not first.is_alive(), "the first run did not stop after the second took over"
        # a newer generation (as the next scheduled run would) ends the second one too
        prices_sink(postgres, schema).take_over(consumer)
        _wait_for(results, "second")
        with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT (symbol, trade_id)) FROM trades")
            assert cur.fetchone() == (len(items), len(items))
    first_res, second_res = results["first"], results["second"]
    assert not isinstance(first_res, BaseException), first_res
    assert not isinstance(second_res, BaseException), second_res
    assert first_res.stopped == "handed over", (first_res.stopped, notes)
    assert second_res.stopped == "handed over", (second_res.stopped, notes)
    assert longest <= GAP_BOUND_S, f"stored count stood still {longest:.1f} s with records waiting"


def test_a_following_transaction_drain_hands_over_with_exact_wallets(kafka, mongo_db, new_topic):
    topic = new_topic(2)
    txs = transactions(users=10, n=3_000, seed=23)
    consumer = f"test-follow-{uuid.uuid4().hex[:8]}"
    results: dict = {}

    def run() -> object:
        return drain_transactions_now(
            kafka, mongo_db.name, consumer, topic, follow=True, max_seconds=300, batch_size=500
        )

    producer = Steady(kafka, topic, txs, per_slice=50)
    first = _follow(results, "first", run)
    producer.start()
    longest, notes = _watch_handover(
        lambda: mongo_db.transactions.count_documents({}),
        len(txs),
        producer,
        lambda: _follow(results, "second", run),
    )
    assert producer.error is None, producer.error
    first.join(LIVENESS_S)
    assert not first.is_alive(), "the first run did not stop after the second took over"
    mongo_db.drain_followers.update_one({"_id": consumer}, {"$inc": {"generation": 1}})
    _wait_for(results, "second")
    assert results["first"].stopped == "handed over", notes
    assert results["second"].stopped == "handed over", notes
    assert wallet_balances(mongo_db) == expected_balances(txs)
    assert longest <= GAP_BOUND_S, f"stored count stood still {longest:.1f} s with records waiting"
