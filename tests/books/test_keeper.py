"""The book keeper's promise to consumers of market.books.raw, checked by a consumer.

A consumer that applies the published events (a snapshot replaces its view, a delta
must carry the previous seq + 1 and sets or removes levels) must hold, after every event,
exactly the top ``depth`` levels of the venue's true book at that event's time; nothing is
published between a resync and the rebuilt book.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from decimal import Decimal as D
from pathlib import Path

import pytest

from tasks.books.book import Book
from tasks.books.keeper import BookKeeper
from tasks.core.codec import decode, encode
from tasks.core.events import BookUpdate
from tasks.venues.coinbase import Coinbase
from tasks.venues.depth import BookDelta, BookSnapshot
from tasks.venues.kraken import Kraken

FIXTURES = Path(__file__).parent / "fixtures"
T0 = 1_764_000_000_000_000  # event times, microseconds
SYM = "BTC-USDT"


class Consumer:
    """What a reader of the topic does with the events."""

    def __init__(self) -> None:
        self.books: dict[str, tuple[int, dict, dict]] = {}
        self.events: list[BookUpdate] = []

    def apply(self, e: BookUpdate) -> None:
        assert decode(encode(e)) == e  # every event is valid on the wire
        self.events.append(e)
        if e.kind == "snapshot":
            self.books[e.symbol] = (e.seq, dict(e.bids), dict(e.asks))
            return
        seq, bids, asks = self.books[e.symbol]
        assert e.seq == seq + 1, f"delta seq {e.seq} after {seq}"
        for side, levels in ((bids, e.bids), (asks, e.asks)):
            for p, q in levels:
                if q == 0:
                    del side[p]
                else:
                    side[p] = q
        self.books[e.symbol] = (e.seq, bids, asks)

    def top(self, symbol: str) -> tuple[list, list]:
        _, bids, asks = self.books[symbol]
        return sorted(bids.items(), reverse=True), sorted(asks.items())


class Venue:
    """A Binance-like venue: one true book, deltas with contiguous update ids."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.book = Book(10_000)
        self.update_id = 0
        self.event_us = T0
        self.book.replace(
            [(D(9000 - i) / 100, D(self.rnd.randint(1, 9))) for i in range(60)],
            [(D(10000 + i) / 100, D(self.rnd.randint(1, 9))) for i in range(60)],
        )

    def delta(self) -> BookDelta:
        """A change of 1-5 levels, near the touch more often than not; never crossed
        (bids below 100, asks at or above)."""
        bids, asks = [], []
        for _ in range(self.rnd.randint(1, 5)):
            ticks = int(self.rnd.expovariate(0.08))
            qty = D(0) if self.rnd.random() < 0.35 else D(self.rnd.randint(1, 9))
            if self.rnd.random() < 0.5:
                bids.append((D(9999 - ticks) / 100, qty))
            else:
                asks.append((D(10000 + ticks) / 100, qty))
        bids, asks = list(dict(bids).items()), list(dict(asks).items())
        self.book.apply(bids, asks)
        first = self.update_id + 1
        self.update_id += 1
        self.event_us += self.rnd.randint(1, 300_000)
        return BookDelta("binance", SYM, tuple(bids), tuple(asks), first, self.update_id,
                         event_us=self.event_us)  # fmt: skip

    def snapshot(self) -> BookSnapshot:
        bids, asks = self.book.top(1000)
        return BookSnapshot("binance", SYM, tuple(bids), tuple(asks), sequence=self.update_id)


def binance_keeper(depth: int = 10, every_s: float = 2.0) -> BookKeeper:
    return BookKeeper("binance", "binance", [SYM], depth, keep=100, snapshot_every_s=every_s)


def sync(keeper: BookKeeper, venue: Venue, consumer: Consumer) -> None:
    """Buffer one delta, then answer the keeper's request for a REST snapshot."""
    for e in keeper.on_frame([venue.delta()], None, T0):
        consumer.apply(e)
    assert keeper.due_fetches() == [SYM]
    for e in keeper.on_rest_snapshot(venue.snapshot(), T0):
        consumer.apply(e)


@pytest.mark.parametrize("seed", range(5))
def test_a_consumer_of_the_events_holds_the_true_top_of_book_after_every_event(seed) -> None:
    venue, keeper, consumer = Venue(seed), binance_keeper(), Consumer()
    sync(keeper, venue, consumer)
    for _ in range(3000):
        delta = venue.delta()
        events = keeper.on_frame([delta], None, delta.event_us + 5)
        for e in events:
            consumer.apply(e)
            assert e.event_us == delta.event_us and e.recv_us == delta.event_us + 5
            assert consumer.top(SYM) == venue.book.top(10), f"after update {venue.update_id}"
    kinds = [e.kind for e in consumer.events]
    assert kinds[0] == "snapshot" and kinds.count("delta") > 1000
    # a snapshot at least every 2 s of event time, and no more often
    snaps = [e.event_us for e in consumer.events if e.kind == "snapshot"]
    assert all(b - a >= 2_000_000 for a, b in itertools.pairwise(snaps))
    assert len(snaps) >= (venue.event_us - T0) // 2_000_000 // 2
    first = consumer.events[0].seq  # the keeper's creation time in microseconds, plus one
    assert abs(first - time.time_ns() // 1000) < 600_000_000  # (the test takes seconds)
    assert [e.seq for e in consumer.events] == list(range(first, first + len(consumer.events)))
    assert not keeper.resyncs and keeper.snapshots + keeper.deltas == len(consumer.events)


def test_after_a_lost_update_nothing_is_published_until_the_book_is_rebuilt() -> None:
    venue, keeper, consumer = Venue(7), binance_keeper(), Consumer()
    sync(keeper, venue, consumer)
    for _ in range(50):
        for e in keeper.on_frame([venue.delta()], None, T0):
            consumer.apply(e)
    venue.delta()  # never delivered
    published = len(consumer.events)
    for _ in range(20):  # the gap is seen at once; these wait for a snapshot
        assert keeper.on_frame([venue.delta()], None, T0) == []
    assert keeper.resyncs == {"sequence_gap": 1} and not keeper.synced(SYM)
    assert keeper.due_fetches() == [SYM] and keeper.due_fetches() == []  # asked once
    rebuilt = keeper.on_rest_snapshot(venue.snapshot(), T0)
    assert rebuilt == []  # an undated REST snapshot is published with the next update
    delta = venue.delta()
    (first,) = keeper.on_frame([delta], None, T0)
    consumer.apply(first)
    assert first.kind == "snapshot" and first.seq == consumer.events[published - 1].seq + 1
    assert consumer.top(SYM) == venue.book.top(10)


def test_a_stale_snapshot_is_asked_for_again_later() -> None:
    venue, keeper = Venue(3), binance_keeper()
    stale = venue.snapshot()
    for _ in range(3):  # sent before the stream was opened
        venue.delta()
    for _ in range(5):
        keeper.on_frame([venue.delta()], None, T0)
    assert keeper.due_fetches() == [SYM]
    assert keeper.on_rest_snapshot(stale, T0) == []
    assert keeper.resyncs == {"stale_snapshot": 1} and not keeper.synced(SYM)
    assert keeper.due_fetches() == []  # not at once: after a pause
    keeper._due[SYM] = 0.0  # (time passes)
    assert keeper.due_fetches() == [SYM]
    assert keeper.on_rest_snapshot(venue.snapshot(), T0) == [] and keeper.synced(SYM)
    (first,) = keeper.on_frame([venue.delta()], None, T0)
    assert first.kind == "snapshot" and first.event_us == venue.event_us


def test_a_book_event_kafka_did_not_take_makes_the_next_one_a_snapshot() -> None:
    venue, keeper, consumer = Venue(11), binance_keeper(every_s=3600), Consumer()
    sync(keeper, venue, consumer)
    while not (events := keeper.on_frame([venue.delta()], None, T0)):
        pass
    keeper.failed(SYM)
    while not (events := keeper.on_frame([venue.delta()], None, T0)):
        pass
    assert [e.kind for e in events] == ["snapshot"]


def frame(venue: str, name: str) -> str:
    return (FIXTURES / venue / name).read_text()


def test_kraken_resubscribes_a_pair_whose_checksum_fails_and_waits_for_its_snapshot() -> None:
    kraken, consumer = Kraken(), Consumer()
    keeper = BookKeeper("kraken", "kraken", ["BTC-USD"], 10, keep=10)
    assert (
        keeper.on_frame(kraken.parse(frame("kraken", "book_snapshot.json"), 0).books, None, T0)
        == []
    )
    assert keeper.synced("BTC-USD")
    for e in keeper.on_frame(kraken.parse(frame("kraken", "book_update.json"), 0).books, None, T0):
        consumer.apply(e)
    assert [e.kind for e in consumer.events] == ["snapshot"]
    assert consumer.events[0].event_us == 1696613755440295
    assert consumer.top("BTC-USD") == keeper.kraken["BTC-USD"].book.top(10)
    wrong = kraken.parse(frame("kraken", "book_update_wrong_checksum.json"), 0).books
    assert keeper.on_frame(wrong, None, T0) == []
    assert keeper.resyncs == {"checksum": 1} and keeper.take_resubscribe() == ["BTC-USD"]
    update = kraken.parse(frame("kraken", "book_update.json"), 0).books
    assert keeper.on_frame(update, None, T0) == []  # ignored until the new snapshot
    assert keeper.take_resubscribe() == []  # asked once
    keeper.on_frame(kraken.parse(frame("kraken", "book_snapshot.json"), 0).books, None, T0)
    (again,) = keeper.on_frame(update, None, T0)
    assert again.kind == "snapshot" and again.seq == consumer.events[0].seq + 1


def test_a_coinbase_sequence_gap_rebuilds_every_book_of_the_connection() -> None:
    coinbase = Coinbase()
    keeper = BookKeeper("coinbase", "coinbase", ["BTC-USD", "ETH-USD"], 2, keep=100)
    seq, books = coinbase.parse_level2(frame("coinbase", "level2_snapshot.json"))
    assert keeper.on_frame(books, seq, 0) == []  # undated
    seq, books = coinbase.parse_level2(frame("coinbase", "level2_update.json"))
    msg = json.loads(frame("coinbase", "level2_update.json"))
    (snap,) = keeper.on_frame(books, 2, 0)  # numbered right after the snapshot
    assert snap.kind == "snapshot" and snap.symbol == "BTC-USD" and snap.depth == 2
    assert keeper.on_frame([], 3, 0) == []  # a heartbeat or trade frame: numbered too
    assert keeper.on_frame(books, 5, 0) == []  # 4 never came
    assert keeper.resyncs == {"sequence_gap": 1}
    assert sorted(keeper.take_resubscribe()) == ["BTC-USD", "ETH-USD"]
    assert not keeper.synced("BTC-USD") and msg["sequence_num"] == seq


def test_a_later_keeper_numbers_each_book_above_an_earlier_one() -> None:
    """A restarted ingestion's first delta can never follow the old run's last event."""
    venue, consumer = Venue(2), Consumer()
    old = binance_keeper()
    sync(old, venue, consumer)
    for _ in range(200):
        for e in old.on_frame([venue.delta()], None, T0):
            consumer.apply(e)
    last_old = consumer.events[-1].seq
    time.sleep(0.001)
    new = binance_keeper()
    sync(new, venue, consumer)
    while not (events := new.on_frame([venue.delta()], None, T0)):
        pass
    assert events[0].kind == "snapshot" and events[0].seq > last_old + 1


def test_a_rebuild_that_keeps_failing_is_asked_for_less_and_less_often() -> None:
    kraken = Kraken()
    keeper = BookKeeper("kraken", "kraken", ["BTC-USD"], 10, keep=10)
    snapshot = kraken.parse(frame("kraken", "book_snapshot.json"), 0).books
    wrong = kraken.parse(frame("kraken", "book_update_wrong_checksum.json"), 0).books
    pauses = []
    for _ in range(5):
        keeper.on_frame(snapshot, None, T0)
        keeper.on_frame(wrong, None, T0)  # fails again after each rebuild
        pause = keeper._due["BTC-USD"] - time.monotonic()
        pauses.append(round(pause))
        if pause > 0.5:
            assert keeper.take_resubscribe() == []
            keeper._due["BTC-USD"] = 0.0  # (the pause passes)
        assert keeper.take_resubscribe() == ["BTC-USD"]
    assert pauses == [0, 1, 2, 4, 8], pauses
    assert keeper.resyncs == {"checksum": 5}


def test_a_subscription_that_never_answers_is_made_again() -> None:
    keeper = BookKeeper("coinbase", "coinbase", ["BTC-USD"], 2, keep=100)
    assert keeper.take_resubscribe() == []  # the connection's own subscription first
    keeper._due["BTC-USD"] = 0.0  # (REBUILD_WAIT_S passes without a snapshot)
    assert keeper.take_resubscribe() == ["BTC-USD"]


def test_a_crossed_first_snapshot_is_asked_for_again() -> None:
    keeper = BookKeeper("coinbase", "coinbase", ["BTC-USD"], 2, keep=100)
    crossed = BookSnapshot("coinbase", "BTC-USD", ((D(101), D(1)),), ((D(100), D(1)),), 1)
    assert keeper.on_frame([], 1, T0) == []
    assert keeper.on_frame([crossed], 2, T0) == []
    assert keeper.resyncs == {"crossed": 1} and keeper.take_resubscribe() == ["BTC-USD"]


def test_wrong_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="no book procedure"):
        BookKeeper("x", "bitstamp", [SYM], 10, keep=100)
    with pytest.raises(ValueError, match="depth must be in"):
        BookKeeper("x", "binance", [SYM], 101, keep=100)
    with pytest.raises(ValueError, match="snapshot_every_s"):
        BookKeeper("x", "binance", [SYM], 10, keep=100, snapshot_every_s=0)
