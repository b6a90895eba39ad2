"""drain_transactions against the real Kafka and MongoDB-protocol server (FerretDB here).

Balances are checked against the wallet rules computed independently in the test
(``expected_balances``), not against the sink's own fold.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from msgspec.structs import replace

from tasks.core.codec import encode
from tasks.core.wallets import fold_transactions, wallet_balances
from tests.drain.support import (
    ROOT,
    drain_transactions_now,
    expected_balances,
    mongo_client,
    mongo_state,
    publish,
    run_crashing,
    transactions,
)

# Its own topics and databases: scripts/test.sh runs it in the second process.
pytestmark = pytest.mark.beside


def _name() -> str:
    return f"test-drain-{uuid.uuid4().hex[:8]}"


def test_duplicates_and_out_of_order_give_exact_balances(kafka, mongo_db, new_topic):
    topic = new_topic(3)
    txs = transactions(users=12, n=1500)
    resent = random.Random(3).sample(txs, 200)  # the same transactions published again
    late = txs[20:40]
    stream = txs[:20] + txs[40:] + resent + late  # 20 arrive late, after their successors
    odd = replace(txs[25], tx_id="odd-symbol", symbol="BTCUSDT")  # valid JSON, no BASE-QUOTE
    publish(kafka, topic, [*stream, (b"user-1", b"{}"), (b"user-1", encode(odd))])

    res = drain_transactions_now(kafka, mongo_db.name, _name(), topic, batch_size=400)

    assert res.stopped == "caught up"
    assert res.rejects == {topic: 2}
    assert res.written.rows["transactions"] == len(txs)
    assert res.written.duplicates["transactions"] == 200
    assert mongo_db.transactions.count_documents({}) == len(txs)
    balances = wallet_balances(mongo_db)
    assert balances == expected_balances(txs)
    assert balances == fold_transactions(mongo_db)
    doc = mongo_db.transactions.find_one({"_id": txs[100].tx_id})
    assert doc["qty"] == str(txs[100].qty) and doc["src"]["topic"] == topic


def test_killed_at_any_step_then_retried_equals_a_clean_run(kafka, mongo, new_topic):
    topic = new_topic(3)
    txs = transactions(users=15, n=2500, seed=11)
    publish(kafka, topic, txs + txs[:100])  # with re-sent ones
    faults = ["mongo_after_transactions:2", "mongo_after_wallets:2", "after_db_commit:2"]
    client = mongo_client(mongo)
    names = {f: f"test_{uuid.uuid4().hex[:10]}" for f in [*faults, "clean"]}
    consumers = {f: _name() for f in names}
    try:
        with ThreadPoolExecutor(len(faults)) as pool:
            codes = list(
                pool.map(
                    lambda f: run_crashing("transactions", names[f], consumers[f], [topic], f, 400),
                    faults,
                )
            )
        assert codes == [75, 75, 75], "every drain should have died at its fault point"
        for f in faults:  # each crashed part-way: some but not all transactions stored
            assert 0 < client[names[f]].transactions.count_documents({}) < len(txs)

        def finish(f: str):  # four drains at once on a loaded machine: 120 s liveness bound
            return drain_transactions_now(
                kafka, names[f], consumers[f], topic, batch_size=400, max_seconds=120
            )

        with ThreadPoolExecutor(len(names)) as pool:
            results = dict(zip(names, pool.map(finish, names), strict=True))
        assert all(r.stopped == "caught up" for r in results.values()), {
            f: r.stopped for f, r in results.items()
        }
        clean = mongo_state(client[names["clean"]])
        assert clean["transactions"][0] == len(txs)
        want = expected_balances(txs)
        for f in faults:
            db = client[names[f]]
            assert mongo_state(db) == clean, f
            assert wallet_balances(db) == want, f
    finally:
        for name in names.values():
            client.drop_database(name)
        client.close()


def test_two_drains_on_disjoint_partitions_give_exact_balances(kafka, mongo_db, new_topic):
    topic = new_topic(6)
    txs = transactions(users=60, n=1500, seed=5)
    publish(kafka, topic, txs)
    consumer, results = _name(), []

    def run(partitions: str) -> None:
        results.append(
            drain_transactions_now(
                kafka, mongo_db.name, consumer, topic, batch_size=60, partitions=partitions,
                max_seconds=300,  # a liveness bound: each stops once caught up
            )
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in ("0,2,4", "1,3,5")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(360)
    assert [r.stopped for r in results] == ["caught up"] * 2, [
        (r.records, r.seconds) for r in results
    ]
    assert all(r.records.get(topic, 0) > 0 for r in results), [r.records for r in results]
    assert sum(r.records.get(topic, 0) for r in results) == len(txs)  # nothing read twice
    assert mongo_db.transactions.count_documents({}) == len(txs)
    assert wallet_balances(mongo_db) == expected_balances(txs)


def test_a_drain_paused_mid_batch_beside_another_loses_no_effect(kafka, mongo_db, new_topic):
    """Two drains of one wallet set (same consumer, same partition): one is frozen with
    SIGSTOP for 10 s while it writes, the other drains everything meanwhile; when the
    frozen one wakes up and writes its stale batch, the version claim makes it re-fold
    onto the newer state, so no effect is lost or applied twice."""
    topic = new_topic(1)
    txs = transactions(users=8, n=6000, seed=17)
    publish(kafka, topic, txs)
    consumer = _name()
    cmd = [sys.executable, "-m", "tests.drain.support", "transactions", mongo_db.name, consumer,
           topic, "--batch-size", "1500"]  # fmt: skip
    frozen = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 60
        while mongo_db.transactions.count_documents({}) == 0:  # it is writing now
            assert frozen.poll() is None, "the first drain ended before it wrote anything"
            assert time.monotonic() < deadline, "the first drain wrote nothing within 60 s"
            time.sleep(0.05)
        os.kill(frozen.pid, signal.SIGSTOP)
        other = drain_transactions_now(kafka, mongo_db.name, consumer, topic, batch_size=700)
        assert other.stopped == "caught up"
        time.sleep(max(0.0, 10 - other.seconds))  # frozen for at least 10 s in all
        os.kill(frozen.pid, signal.SIGCONT)
        assert frozen.wait(120) == 0, "the woken drain did not finish within 120 s"
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
            frozen.kill()
    assert mongo_db.transactions.count_documents({}) == len({t.tx_id for t in txs})
    assert wallet_balances(mongo_db) == expected_balances(txs)
    assert wallet_balances(mongo_db) == fold_transactions(mongo_db)
