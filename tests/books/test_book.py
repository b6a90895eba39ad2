"""The L2 book: exact levels, quantity 0 deletes, the depth cap drops the worst levels,
and best/spread/mid/crossed read the top."""

from __future__ import annotations

from decimal import Decimal as D

import pytest

from tasks.books.book import Book


def test_levels_are_exact_and_ordered_best_first() -> None:
    book = Book(depth=5)
    book.replace([(D("99.5"), D("1")), (D("100.1"), D("0.5"))], [(D("101"), D("2"))])
    assert book.bids() == [(D("100.1"), D("0.5")), (D("99.5"), D("1"))]
    assert book.asks() == [(D("101"), D("2"))]
    assert book.best_bid() == D("100.1") and book.best_ask() == D("101")
    assert book.spread() == D("0.9") and book.mid() == D("100.55")
    assert not book.crossed()


def test_quantity_zero_deletes_and_a_new_quantity_replaces() -> None:
    book = Book(depth=5)
    book.replace([(D("1"), D("1")), (D("2"), D("1"))], [])
    book.apply([(D("2"), D("0")), (D("1"), D("3")), (D("0.5"), D("0"))], [])
    assert book.bids() == [(D("1"), D("3"))]  # deleting an unknown level is harmless


def test_the_cap_drops_the_worst_levels_of_each_side() -> None:
    book = Book(depth=3)
    book.replace(
        [(D(p), D("1")) for p in ("10", "9", "8", "7")],
        [(D(p), D("1")) for p in ("11", "12", "13", "14")],
    )
    assert [p for p, _ in book.bids()] == [D("10"), D("9"), D("8")]
    assert [p for p, _ in book.asks()] == [D("11"), D("12"), D("13")]
    book.apply([(D("7.5"), D("1"))], [(D("10.5"), D("1"))])  # worse bid in, better ask in
    assert [p for p, _ in book.bids()] == [D("10"), D("9"), D("8")]
    assert [p for p, _ in book.asks()] == [D("10.5"), D("11"), D("12")]
    one = D("1")
    assert book.top(2) == ([(D("10"), one), (D("9"), one)], [(D("10.5"), one), (D("11"), one)])
    assert len(book) == 6


def test_the_cap_applies_after_a_whole_message() -> None:
    """A level pushed past the cap and pulled back by a later deletion in the same
    message stays (Kraken truncates after the message)."""
    book = Book(depth=2)
    book.replace([(D("10"), D("1")), (D("9"), D("1"))], [])
    book.apply([(D("11"), D("1")), (D("11"), D("0"))], [])
    assert book.bids() == [(D("10"), D("1")), (D("9"), D("1"))]


def test_an_empty_side_has_no_best_spread_or_mid() -> None:
    book = Book(depth=1)
    book.replace([(D("1"), D("1"))], [])
    assert book.best_ask() is None and book.spread() is None and book.mid() is None
    assert not book.crossed()


@pytest.mark.parametrize("bid", ["100", "100.5"])
def test_a_locked_or_crossed_book_is_crossed(bid: str) -> None:
    book = Book(depth=2)
    book.replace([(D(bid), D("1"))], [(D("100"), D("1"))])
    assert book.crossed()


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Book(depth=0)


def test_the_top_is_exact_only_while_the_kept_window_covers_it() -> None:
    """A price move through every kept level brings unknown levels to the top: the book
    must say so rather than show a top with holes."""
    book = Book(depth=4)
    book.replace([], [(D(100 + i), D(1)) for i in range(6)])  # 104, 105 dropped
    assert book.asks() == [(D(100), D(1)), (D(101), D(1)), (D(102), D(1)), (D(103), D(1))]
    assert book.exact(3) and not book.exact(4)  # 103 filled the window: 104 may follow it
    book.apply([], [(D(100), D(0))])
    assert book.exact(2) and not book.exact(3)
    book.apply([], [(D(99), D(2)), (D(98), D(2))])  # new levels at the touch push 103 out
    assert [p for p, _ in book.asks()] == [D(98), D(99), D(101), D(102)] and book.exact(4)
    book.apply([], [(D(p), D(0)) for p in (98, 99, 101)])
    assert book.asks() == [(D(102), D(1))] and book.exact(1) and not book.exact(2)


def test_a_snapshot_shorter_than_the_window_is_complete() -> None:
    book = Book(depth=10)
    book.replace([(D(1), D(1))], [(D(2), D(1))])
    book.apply([(D(1), D(0))], [])
    assert book.exact(10)  # nothing was ever cut: an empty side is the venue's
