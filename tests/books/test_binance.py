"""Binance diff depth: documented frames parse exactly, malformed ones are FeedError, and
the sync follows "How to manage a local order book correctly": drop what the snapshot
holds, straddle it, then strictly contiguous ``U``/``u``; anything else is a resync."""

from __future__ import annotations

import json
from decimal import Decimal as D
from pathlib import Path

import pytest

from tasks.books.sync import (
    BUFFER_FULL,
    CROSSED,
    SEQUENCE_GAP,
    STALE_SNAPSHOT,
    BinanceSync,
    Resync,
)
from tasks.venues.base import FeedError
from tasks.venues.binance import Binance
from tasks.venues.depth import BookDelta, BookSnapshot

FIXTURES = Path(__file__).parent / "fixtures" / "binance"


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


def snapshot(last_id: int, bids=(("10", "1"),), asks=(("11", "1"),)) -> BookSnapshot:
    return BookSnapshot("binance", "BTC-USDT", _levels(bids), _levels(asks), sequence=last_id)


def delta(first: int, last: int, bids=(), asks=()) -> BookDelta:
    return BookDelta("binance", "BTC-USDT", _levels(bids), _levels(asks), first, last)


def _levels(pairs) -> tuple[tuple[D, D], ...]:
    return tuple((D(p), D(q)) for p, q in pairs)


def test_documented_frames_parse_exactly() -> None:
    binance = Binance()
    parsed = binance.parse(frame("depth_update_straddle.json"), 1)
    assert parsed.books == [binance.parse_depth(frame("depth_update_straddle.json"))]
    assert binance.parse_depth(frame("depth_update_straddle.json")) == BookDelta(
        "binance", "BNB-BTC",
        ((D("4.00000000"), D("400.00000000")), (D("3.99000000"), D("0.00000000"))),
        ((D("4.00000100"), D("1.00000000")),),
        1027020, 1027030, event_us=1672515782136000,
    )  # fmt: skip
    body = json.loads(frame("depth_snapshot.json"))
    assert binance.depth_snapshot("BNB-BTC", body) == BookSnapshot(
        "binance", "BNB-BTC",
        ((D("4.00000000"), D("431.00000000")), (D("3.99000000"), D("12.50000000"))),
        ((D("4.00000200"), D("12.00000000")), (D("4.01000000"), D("3.00000000"))),
        sequence=1027024,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "bad_depth_U_after_u.json",
        "bad_depth_level_not_pair.json",
        "bad_depth_negative_qty.json",
        "bad_depth_missing_u.json",
    ],
)
def test_malformed_depth_frames_are_feed_errors(name: str) -> None:
    with pytest.raises(FeedError):
        Binance().parse_depth(frame(name))


def test_a_snapshot_without_last_update_id_is_a_feed_error() -> None:
    with pytest.raises(FeedError, match="lastUpdateId"):
        body = json.loads(frame("bad_snapshot_no_last_update_id.json"))
        Binance().depth_snapshot("BNB-BTC", body)


def test_the_documented_procedure_on_fixtures() -> None:
    """Buffered: an old delta (dropped), one straddling lastUpdateId+1; then the next."""
    binance, sync = Binance(), BinanceSync(depth=100)
    assert sync.on_delta(binance.parse_depth(frame("depth_update_old.json"))) is None
    assert sync.on_delta(binance.parse_depth(frame("depth_update_straddle.json"))) is None
    assert not sync.synced
    body = json.loads(frame("depth_snapshot.json"))
    assert sync.on_snapshot(binance.depth_snapshot("BNB-BTC", body)) is None
    assert sync.synced and sync.update_id == 1027030
    # the old delta's bid (4 -> 1) was not applied: the snapshot already held it
    assert sync.book.bids() == [(D("4.00000000"), D("400.00000000"))]
    assert sync.book.best_ask() == D("4.00000100")
    assert sync.on_delta(binance.parse_depth(frame("depth_update_next.json"))) is None
    assert sync.update_id == 1027033
    assert sync.book.bids() == [(D("4.00000000"), D("400.00000000")), (D("3.98"), D("7"))]
    assert sync.book.best_ask() == D("4.00000200")


@pytest.mark.parametrize("first", [95, 100, 101])
def test_the_first_delta_must_straddle_the_snapshot(first: int) -> None:
    sync = BinanceSync(depth=10)
    assert sync.on_snapshot(snapshot(100)) is None
    assert sync.on_delta(delta(90, 100)) is None  # older than the snapshot: dropped
    assert sync.on_delta(delta(first, 105, bids=[("10", "2")])) is None  # U <= 101 <= u
    assert sync.update_id == 105 and sync.book.bids() == [(D("10"), D("2"))]


def test_a_first_delta_past_the_snapshot_is_a_gap() -> None:
    sync = BinanceSync(depth=10)
    sync.on_snapshot(snapshot(100))
    outcome = sync.on_delta(delta(102, 105))
    assert outcome is not None and outcome.reason == SEQUENCE_GAP
    assert not sync.synced and sync.book.bids() == []


def test_a_snapshot_older_than_every_buffered_delta_is_stale() -> None:
    sync = BinanceSync(depth=10)
    sync.on_delta(delta(200, 210))
    sync.on_delta(delta(211, 215))
    outcome = sync.on_snapshot(snapshot(150))
    assert outcome is not None and outcome.reason == STALE_SNAPSHOT
    assert not sync.synced
    # the buffer is kept: a newer snapshot still syncs with it
    assert sync.on_snapshot(snapshot(205)) is None and sync.update_id == 215


def test_a_snapshot_right_before_the_buffer_is_not_stale() -> None:
    sync = BinanceSync(depth=10)
    sync.on_delta(delta(200, 210))
    assert sync.on_snapshot(snapshot(199)) is None and sync.update_id == 210


def test_a_gap_after_sync_resyncs_and_keeps_buffering() -> None:
    sync = BinanceSync(depth=10)
    sync.on_snapshot(snapshot(100))
    assert sync.on_delta(delta(101, 110)) is None
    assert sync.on_delta(delta(111, 111)) is None
    outcome = sync.on_delta(delta(113, 120))  # 112 never came
    assert outcome == Resync(SEQUENCE_GAP, "U=113 after u=111")
    assert not sync.synced and sync.book.bids() == []
    # the delta that showed the gap starts the new buffer
    assert sync.on_delta(delta(121, 125)) is None
    assert sync.on_snapshot(snapshot(118)) is None and sync.update_id == 125


def test_a_gap_while_buffering_restarts_the_buffer() -> None:
    sync = BinanceSync(depth=10)
    sync.on_delta(delta(10, 20))
    outcome = sync.on_delta(delta(25, 30))
    assert outcome is not None and outcome.reason == SEQUENCE_GAP
    assert sync.on_snapshot(snapshot(26)) is None and sync.update_id == 30


def test_a_full_buffer_resyncs_and_keeps_the_newest_delta() -> None:
    sync = BinanceSync(depth=10, max_buffer=3)
    for n in range(3):
        assert sync.on_delta(delta(n * 10 + 1, n * 10 + 10)) is None
    outcome = sync.on_delta(delta(31, 40))
    assert outcome is not None and outcome.reason == BUFFER_FULL
    assert sync.on_snapshot(snapshot(35)) is None and sync.update_id == 40


def test_a_delta_that_crosses_the_book_resyncs() -> None:
    sync = BinanceSync(depth=10)
    sync.on_snapshot(snapshot(100))
    outcome = sync.on_delta(delta(101, 101, bids=[("11.5", "1")]))
    assert outcome is not None and outcome.reason == CROSSED and not sync.synced


def test_deltas_after_a_resync_inside_on_snapshot_are_buffered_again() -> None:
    """A buffered delta crosses the book as the snapshot is applied: the deltas after it
    wait for the next snapshot instead of being applied to an empty book."""
    sync = BinanceSync(depth=10)
    sync.on_delta(delta(101, 101, bids=[("12", "1")]))  # crosses the snapshot's ask
    sync.on_delta(delta(102, 102))
    outcome = sync.on_snapshot(snapshot(100))
    assert outcome is not None and outcome.reason == CROSSED
    assert not sync.synced
    assert sync.on_snapshot(snapshot(101)) is None and sync.update_id == 102


def test_a_crossed_snapshot_resyncs_and_keeps_the_buffer() -> None:
    sync = BinanceSync(depth=10)
    sync.on_delta(delta(101, 105))
    outcome = sync.on_snapshot(snapshot(100, bids=[("12", "1")]))
    assert outcome is not None and outcome.reason == CROSSED and not sync.synced
    assert sync.on_snapshot(snapshot(102)) is None and sync.update_id == 105
