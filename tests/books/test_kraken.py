"""Kraken v2 ``book``: documented frames parse with the digits Kraken sent, the
checksum is Kraken's documented CRC32 (checked here against an independent
implementation and a value worked out by hand), a wrong checksum resyncs, and the book is
truncated to the subscribed depth."""

from __future__ import annotations

import binascii
import json
from decimal import Decimal as D
from pathlib import Path

import pytest

from tasks.books.book import Book
from tasks.books.sync import CHECKSUM, KrakenSync, kraken_checksum
from tasks.venues.base import FeedError
from tasks.venues.depth import BookDelta, BookSnapshot
from tasks.venues.kraken import Kraken

FIXTURES = Path(__file__).parent / "fixtures" / "kraken"


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


def reference_checksum(asks: dict[str, str], bids: dict[str, str]) -> int:
    """Kraken's algorithm on the numbers' *text*, written apart from the adapter: top 10
    asks low to high, top 10 bids high to low, '.' removed, leading zeros stripped."""

    def digits(text: str) -> str:
        return text.replace(".", "").lstrip("0")

    top_asks = sorted(asks.items(), key=lambda kv: D(kv[0]))[:10]
    top_bids = sorted(bids.items(), key=lambda kv: D(kv[0]), reverse=True)[:10]
    text = "".join(digits(p) + digits(q) for p, q in top_asks + top_bids)
    return binascii.crc32(text.encode())


def text_levels(raw: str) -> tuple[dict[str, str], dict[str, str]]:
    """The fixture's (bids, asks) as price text -> qty text, numbers read as written."""
    data = json.loads(raw, parse_float=str, parse_int=str)["data"][0]
    return (
        {lv["price"]: lv["qty"] for lv in data["bids"]},
        {lv["price"]: lv["qty"] for lv in data["asks"]},
    )


def test_the_crc32_of_123456789_is_the_standard_check_value() -> None:
    """Worked by hand: one ask at 1234.5 for 67.89 writes "12345" + "6789" = "123456789",
    whose CRC-32 is the algorithm's published check value 0xCBF43926 = 3421780262."""
    book = Book(depth=10)
    book.replace([], [(D("1234.5"), D("67.89"))])
    assert kraken_checksum(book) == 0xCBF43926 == 3421780262


def test_leading_zeros_and_exponents_are_written_like_kraken() -> None:
    """0.05000 for 0.00000304 is "5000304" (Kraken's v1 guide example); a Decimal read
    as 1E-7 is still written 0.0000001 ("1"), and qty zeros after the point are kept."""
    book = Book(depth=10)
    book.replace([(D("1E-7"), D("0.00100000"))], [(D("0.05000"), D("0.00000304"))])
    assert kraken_checksum(book) == binascii.crc32(b"5000304" + b"1100000")


def test_the_snapshot_fixture_parses_exactly_and_its_checksum_matches() -> None:
    (snap,) = Kraken().parse_book(frame("book_snapshot.json"))
    assert isinstance(snap, BookSnapshot)
    assert (snap.venue, snap.symbol) == ("kraken", "BTC-USD")
    assert len(snap.bids) == len(snap.asks) == 10
    assert snap.bids[0] == (D("45283.5"), D("0.10000000"))  # trailing zeros kept
    bids, asks = text_levels(frame("book_snapshot.json"))
    assert snap.checksum == reference_checksum(asks, bids)
    sync = KrakenSync(depth=10)
    assert sync.on_snapshot(snap) is None and sync.synced
    assert kraken_checksum(sync.book) == reference_checksum(asks, bids)


def test_book_frames_come_through_parse_with_their_time() -> None:
    kraken = Kraken()
    parsed = kraken.parse(frame("book_update.json"), recv_us=0)
    assert parsed.books == kraken.parse_book(frame("book_update.json"))
    assert parsed.books[0].event_us == 1696613755440295  # 2023-10-06T17:35:55.440295Z
    assert kraken.parse(frame("book_snapshot.json"), recv_us=0).books[0].event_us is None


def test_subscribing_asks_for_the_smallest_depth_that_holds_the_published_one() -> None:
    from dataclasses import replace

    from tasks.venues.kraken import CONFIG

    kraken = Kraken(replace(CONFIG, book_depth=20))
    (frame_,) = kraken.subscribe_frames(["BTC-USD"], ["books"])
    assert json.loads(frame_)["params"] == {
        "channel": "book", "symbol": ["BTC/USD"], "depth": 25, "snapshot": True
    }  # fmt: skip
    unsub, sub = map(json.loads, kraken.book_resync_frames(["BTC-USD"]))
    assert unsub["method"] == "unsubscribe" and sub["method"] == "subscribe"
    assert sub["params"]["depth"] == 25 and sub["params"]["symbol"] == ["BTC/USD"]


def test_an_update_keeps_the_book_in_step() -> None:
    kraken, sync = Kraken(), KrakenSync(depth=10)
    sync.on_snapshot(kraken.parse_book(frame("book_snapshot.json"))[0])
    (update,) = kraken.parse_book(frame("book_update.json"))
    assert isinstance(update, BookDelta) and update.asks[0] == (D("45285.2"), D("0"))
    assert sync.on_delta(update) is None
    assert sync.book.best_ask() == D("45286.4")
    assert sync.book.bids(2)[1] == (D("45283.4"), D("0.50000000"))
    assert len(sync.book.asks()) == 10


def test_a_wrong_checksum_resyncs() -> None:
    kraken, sync = Kraken(), KrakenSync(depth=10)
    sync.on_snapshot(kraken.parse_book(frame("book_snapshot.json"))[0])
    outcome = sync.on_delta(kraken.parse_book(frame("book_update_wrong_checksum.json"))[0])
    assert outcome is not None and outcome.reason == CHECKSUM
    assert not sync.synced and len(sync.book) == 0
    # updates wait for the next snapshot
    assert sync.on_delta(kraken.parse_book(frame("book_update.json"))[0]) is None
    assert len(sync.book) == 0


def test_levels_pushed_out_of_the_subscribed_depth_are_dropped() -> None:
    """An insert pushes the 10th bid out of a depth-10 book; Kraken will not delete it.
    When the insert goes again Kraken sends the level now 10th, which is not the one
    pushed out (that one was cancelled meanwhile): only a truncated book matches."""
    kraken, sync = Kraken(), KrakenSync(depth=10)
    sync.on_snapshot(kraken.parse_book(frame("book_snapshot.json"))[0])
    for name in ("book_update.json", "book_update_insert.json", "book_update_refill.json"):
        assert sync.on_delta(kraken.parse_book(frame(name))[0]) is None, name
    bids = [p for p, _ in sync.book.bids()]
    assert len(bids) == 10 and D("45277.3") not in bids and bids[-1] == D("45276.9")

    untruncated = Book(depth=1000)  # what a book that skips truncation would hold
    for name in ("book_snapshot.json", "book_update.json", "book_update_insert.json"):
        item = kraken.parse_book(frame(name))[0]
        untruncated.apply(item.bids, item.asks)
    refill = kraken.parse_book(frame("book_update_refill.json"))[0]
    untruncated.apply(refill.bids, refill.asks)
    assert kraken_checksum(untruncated) != refill.checksum


@pytest.mark.parametrize(
    "name",
    [
        "bad_book_level_not_object.json",
        "bad_book_checksum_negative.json",
        "bad_book_unknown_type.json",
        "bad_book_missing_checksum.json",
    ],
)
def test_malformed_book_frames_are_feed_errors(name: str) -> None:
    with pytest.raises(FeedError):
        Kraken().parse_book(frame(name))


def test_the_book_holds_at_least_the_checksummed_levels() -> None:
    with pytest.raises(ValueError):
        KrakenSync(depth=9)
    assert Kraken().book_depth == 10  # the default published depth, one Kraken offers
