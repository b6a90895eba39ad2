"""Coinbase Advanced Trade ``level2``: documented ``l2_data`` frames parse exactly,
malformed ones are FeedError, and a skipped ``sequence_num`` drops the connection's books."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import pytest

from tasks.books.sync import CROSSED, SEQUENCE_GAP, CoinbaseSync, Resync
from tasks.venues.base import FeedError
from tasks.venues.coinbase import Coinbase
from tasks.venues.depth import BookDelta, BookSnapshot

FIXTURES = Path(__file__).parent / "fixtures" / "coinbase"


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_documented_frames_parse_exactly() -> None:
    coinbase = Coinbase()
    assert coinbase.parse_level2(frame("level2_snapshot.json")) == (
        1,
        [
            BookSnapshot(
                "coinbase", "BTC-USD",
                ((D("21921.73"), D("0.06317902")), (D("21921.3"), D("0.02"))),
                ((D("21921.74"), D("0.01")), (D("21922.5"), D("1.5"))),
                sequence=1,
            )
        ],
    )  # fmt: skip
    seq, (update,) = coinbase.parse_level2(frame("level2_update.json"))
    assert seq == 3 and update == BookDelta(
        "coinbase", "BTC-USD", ((D("21921.3"), D("0")),), ((D("21921.74"), D("0.25")),), 3, 3,
        event_us=1675974770714964,  # event_time, to the microsecond
    )  # fmt: skip
    parsed = coinbase.parse(frame("level2_update.json"), recv_us=0)
    assert parsed.sequence == 3 and parsed.books == [update] and not parsed.events


def test_the_sequence_counts_every_frame_of_the_connection() -> None:
    coinbase, sync = Coinbase(), CoinbaseSync(depth=50)
    assert sync.on_frame(*coinbase.parse_level2(frame("level2_snapshot.json"))) is None
    heartbeat = coinbase.parse(frame("heartbeats.json"), recv_us=0)
    assert heartbeat.sequence == 2 and sync.on_frame(heartbeat.sequence) is None
    assert sync.on_frame(*coinbase.parse_level2(frame("level2_update.json"))) is None
    book = sync.books["BTC-USD"]
    assert book.bids() == [(D("21921.73"), D("0.06317902"))]
    assert book.asks() == [(D("21921.74"), D("0.25")), (D("21922.5"), D("1.5"))]


def test_a_skipped_sequence_num_drops_every_book() -> None:
    coinbase, sync = Coinbase(), CoinbaseSync(depth=50)
    sync.on_frame(*coinbase.parse_level2(frame("level2_snapshot.json")))
    sync.on_frame(2)
    sync.on_frame(*coinbase.parse_level2(frame("level2_update.json")))
    outcome = sync.on_frame(*coinbase.parse_level2(frame("level2_update_after_gap.json")))
    assert outcome == Resync(SEQUENCE_GAP, "sequence_num 5 after 3")
    assert not sync.synced("BTC-USD")
    # the update that showed the gap is not applied to anything; a snapshot restarts
    _, (snap,) = coinbase.parse_level2(frame("level2_snapshot.json"))
    assert sync.on_frame(6, [snap]) is None and sync.synced("BTC-USD")


def test_a_snapshot_in_the_frame_that_shows_the_gap_still_counts() -> None:
    sync = CoinbaseSync(depth=50)
    sync.on_frame(1)
    snap = BookSnapshot("coinbase", "ETH-USD", ((D("1"), D("1")),), ((D("2"), D("1")),), 9)
    outcome = sync.on_frame(9, [snap])
    assert outcome is not None and outcome.reason == SEQUENCE_GAP
    assert sync.synced("ETH-USD")


def test_updates_before_a_snapshot_are_ignored() -> None:
    sync = CoinbaseSync(depth=50)
    update = BookDelta("coinbase", "BTC-USD", ((D("1"), D("1")),), (), 1, 1)
    assert sync.on_frame(1, [update]) is None and not sync.synced("BTC-USD")


def test_a_crossed_book_is_dropped() -> None:
    sync = CoinbaseSync(depth=50)
    snap = BookSnapshot("coinbase", "BTC-USD", ((D("1"), D("1")),), ((D("2"), D("1")),), 1)
    sync.on_frame(1, [snap])
    outcome = sync.on_frame(2, [BookDelta("coinbase", "BTC-USD", ((D("2.5"), D("1")),), (), 2, 2)])
    assert outcome is not None and outcome.reason == CROSSED
    assert not sync.synced("BTC-USD")


@pytest.mark.parametrize(
    "name",
    [
        "bad_level2_unknown_side.json",
        "bad_level2_missing_new_quantity.json",
        "bad_level2_no_sequence.json",
        "heartbeats.json",  # not a level2 frame
    ],
)
def test_malformed_level2_frames_are_feed_errors(name: str) -> None:
    with pytest.raises(FeedError):
        Coinbase().parse_level2(frame(name))


def test_a_late_number_is_one_gap_not_two() -> None:
    sync = CoinbaseSync(depth=10)
    outcomes = [sync.on_frame(n) for n in (1, 2, 4, 3, 5, 6)]
    assert [o.reason if o else None for o in outcomes] == [
        None, None, "sequence_gap", "sequence_gap", None, None
    ]  # fmt: skip
