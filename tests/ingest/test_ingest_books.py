"""Order books from the simulator through ingestion into the real local Kafka.

What consumers of market.books.raw are promised, checked the way they meet it: read the
topic, apply the events (a snapshot replaces the view, a delta must carry the previous
seq + 1), and after every event the view must equal the simulator's true book at that
event's time (``Simulator.book_at``). Faults injected into each venue's protocol (a lost
update, a wrong checksum, a stale REST snapshot) must each cost exactly one resync of the
reason they name, and since every event is checked against the truth, no event of a
broken book can have been published.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from simulator import Simulator
from tasks.core import codec
from tasks.core.events import BookUpdate
from tasks.ingest.live import Ingestion, plan
from tasks.ingest.publish import Topics
from tests.ingest.support import read_topic

SYMBOLS = ["BTC-USDT", "ETH-USDT"]
DEPTH = 10
# venue -> the faults injected (action, symbol), and the resync reason each must cause
FAULTS: dict[str, list[tuple[str, str, str]]] = {
    "binance": [
        ("book_gap", "BTC-USDT", "sequence_gap"),
        # the next REST snapshot of ETH is 3 s old: asked for after the gap that follows
        ("stale_snapshot", "ETH-USDT", "stale_snapshot"),
        ("book_gap", "ETH-USDT", "sequence_gap"),
    ],
    "kraken": [
        ("book_checksum", "BTC-USDT", "checksum"),
        ("book_checksum", "ETH-USDT", "checksum"),
    ],
    "coinbase": [("book_gap", "BTC-USDT", "sequence_gap")],
}


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)


def _all_synced(ingestion: Ingestion) -> bool:
    return all(
        w.books is not None and all(w.books.synced(s) for s in w.symbols) for w in ingestion.workers
    )


def _resyncs(ingestion: Ingestion) -> Counter[str]:
    """Resyncs so far by reason (read while the readers may add one: asked again then)."""
    try:
        return sum((Counter(w.books.resyncs) for w in ingestion.workers if w.books), Counter())
    except RuntimeError:  # changed size during iteration
        return Counter()


@pytest.mark.parametrize("venue", sorted(FAULTS))
def test_published_books_are_the_true_books_and_each_fault_costs_one_resync(
    kafka, new_topic, venue
):
    books = new_topic(3)
    with Simulator(symbols=tuple(SYMBOLS), rate=200, port=0, seed=5) as sim:
        p = plan(
            venue, SYMBOLS, ["books"], simulator_url=sim.http_url, book_depth=DEPTH,
            book_snapshot_s=1.0,
        )  # fmt: skip
        ingestion = Ingestion(p, kafka, run_id=f"books-{venue}", topics=Topics(books=books))
        ingestion.start()
        try:
            _wait("every book to be built", lambda: _all_synced(ingestion), 60)
            time.sleep(2)
            for action, symbol, _ in FAULTS[venue]:
                sim.inject(action, venue, symbol)
                time.sleep(0.5)  # a stale snapshot is served at the next depth request
            expected = Counter(reason for _, _, reason in FAULTS[venue])
            # every fault seen (a book may still look synced before the last one is found)
            _wait("each fault to cost its resync", lambda: _resyncs(ingestion) >= expected, 60)
            _wait("the books to be rebuilt", lambda: _all_synced(ingestion), 60)
            time.sleep(2)
        finally:
            report = ingestion.stop()
        assert report["book_resyncs"] == dict(expected), report["book_resyncs"]
        assert report["shard_errors"] == [] and report["failed"] == 0
        assert report["sent"] == report["acked"] == report["book_snapshots"] + report["book_deltas"]

        # per partition in offset order: each book (key) in its own order
        events = [codec.decode(r.value) for recs in read_topic(kafka, books).values() for r in recs]
        assert len(events) == report["sent"]
        views: dict[str, tuple[int, dict, dict]] = {}
        checked: Counter[str] = Counter()
        for e in events:
            assert type(e) is BookUpdate and e.venue == f"{venue}-sim" and e.depth == DEPTH
            if e.kind == "snapshot":
                views[e.symbol] = (e.seq, dict(e.bids), dict(e.asks))
            else:
                seq, bids, asks = views[e.symbol]
                assert e.seq == seq + 1, f"{e.symbol}: delta {e.seq} after {seq}"
                for side, levels in ((bids, e.bids), (asks, e.asks)):
                    for price, qty in levels:
                        if qty:
                            side[price] = qty
                        else:
                            del side[price]
                views[e.symbol] = (e.seq, bids, asks)
            _, bids, asks = views[e.symbol]
            truth = sim.book_at(e.symbol, e.event_us, DEPTH)
            ours = (sorted(bids.items(), reverse=True), sorted(asks.items()))
            assert ours == (
                [tuple(lv) for lv in truth["bids"]],
                [tuple(lv) for lv in truth["asks"]],
            ), f"{e.symbol} {e.kind} seq {e.seq} at {e.event_us}"
            checked[e.kind] += 1
        # a rebuilt book is published again, starting with a snapshot
        assert checked["snapshot"] >= 2 * len(SYMBOLS) and checked["delta"] >= 20, checked
