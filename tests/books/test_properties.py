"""Properties: the book parsers answer any input with events or FeedError, nothing else;
and random valid Kraken updates keep the book within its depth, equal to a plain model
of the documented rules, with a checksum equal to one computed independently."""

from __future__ import annotations

import binascii
import contextlib
import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.books.sync import KrakenSync, kraken_checksum
from tasks.venues.base import FeedError
from tasks.venues.binance import Binance
from tasks.venues.coinbase import Coinbase
from tasks.venues.kraken import Kraken

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["0", "-1", "1e999999", "NaN", "0.1", "BTC/USD", "BTC-USD", "BNBBTC"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _near(keys: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Objects with a frame's own keys: all of them, mostly with valid values, or some
    of them with any values."""
    mostly_valid = {k: st.one_of(v, v, v, JSON) for k, v in keys.items()}
    return st.fixed_dictionaries(mostly_valid) | st.fixed_dictionaries(
        {}, optional={k: v | JSON for k, v in keys.items()}
    )


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, valid, SCALARS)


TEXT_NUMBER = _mostly(st.decimals(min_value=0, max_value=10**6, places=4).map(str))
JSON_NUMBER = _mostly(st.floats(min_value=0, max_value=1e6))
BINANCE_ROWS = st.lists(_mostly(st.tuples(TEXT_NUMBER, TEXT_NUMBER).map(list)), max_size=3)
KRAKEN_ROWS = st.lists(
    _mostly(st.fixed_dictionaries({"price": JSON_NUMBER, "qty": JSON_NUMBER})), max_size=3
)
COINBASE_ROWS = st.lists(
    _mostly(
        st.fixed_dictionaries({
            "side": _mostly(st.sampled_from(["bid", "offer"])),
            "price_level": TEXT_NUMBER, "new_quantity": TEXT_NUMBER,
        })
    ),
    max_size=3,
)  # fmt: skip
FRAMES = st.one_of(
    JSON,
    _near({
        "e": st.just("depthUpdate"), "s": st.just("BNBBTC"), "U": st.integers(-1, 3),
        "u": st.integers(-1, 3), "b": BINANCE_ROWS, "a": BINANCE_ROWS,
        "lastUpdateId": st.integers(-1, 3), "bids": BINANCE_ROWS, "asks": BINANCE_ROWS,
    }),
    _near({
        "channel": st.just("book"), "type": st.sampled_from(["snapshot", "update"]),
        "data": st.lists(_near({
            "symbol": st.just("BTC/USD"), "bids": KRAKEN_ROWS, "asks": KRAKEN_ROWS,
            "checksum": st.integers(-1, 2**33),
        }), max_size=2),
    }),
    _near({
        "channel": st.just("l2_data"), "sequence_num": st.integers(-1, 3),
        "events": st.lists(_near({
            "type": st.sampled_from(["snapshot", "update"]), "product_id": st.just("BTC-USD"),
            "updates": COINBASE_ROWS,
        }), max_size=2),
    }),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(FRAMES, st.booleans())
def test_parsers_raise_only_feed_error(obj: object, envelope: bool) -> None:
    obj = {"stream": "bnbbtc@depth", "data": obj} if envelope else obj
    raw = json.dumps(obj)
    parsers = [
        Binance().parse_depth, Kraken().parse_book, Coinbase().parse_level2,
        lambda _raw: Binance().depth_snapshot("BNB-BTC", obj),
    ]  # fmt: skip
    for parse in parsers:
        with contextlib.suppress(FeedError):
            parse(raw)


@given(st.binary(max_size=64) | st.text(max_size=64))
def test_parsers_raise_only_feed_error_on_any_bytes(raw: bytes | str) -> None:
    for parse in (Binance().parse_depth, Kraken().parse_book, Coinbase().parse_level2):
        with contextlib.suppress(FeedError):
            parse(raw)


# Prices on a narrow grid, so updates often hit levels the book holds, bids below asks,
# so the book never crosses; written with their decimals as Kraken sends them.
# Quantities have 8 decimals, or are 0 (delete) about a third of the time.
BID_CENTS = st.integers(100, 160)
ASK_CENTS = st.integers(5_001, 5_060)
QTY = st.one_of(st.just(0), st.integers(1, 3 * 10**8), st.integers(1, 3 * 10**8))


def price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def qty_text(units: int) -> str:
    return "0" if units == 0 else f"{units // 10**8}.{units % 10**8:08d}"


def levels(cents: st.SearchStrategy[int]) -> st.SearchStrategy[list[tuple[str, str]]]:
    return st.lists(st.tuples(cents.map(price_text), QTY.map(qty_text)), max_size=8)


class Model:
    """The documented rules on the numbers' text: set each level (0 deletes), then keep
    the ``depth`` best of each side; the checksum as Kraken's guide spells it."""

    def __init__(self, depth: int):
        self.depth = depth
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def apply(self, bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> None:
        for side, changes in ((self.bids, bids), (self.asks, asks)):
            for price, qty in changes:
                if Decimal(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.bids = dict(self.best_bids(self.depth))
        self.asks = dict(self.best_asks(self.depth))

    def best_bids(self, n: int) -> list[tuple[str, str]]:
        return sorted(self.bids.items(), key=lambda kv: Decimal(kv[0]), reverse=True)[:n]

    def best_asks(self, n: int) -> list[tuple[str, str]]:
        return sorted(self.asks.items(), key=lambda kv: Decimal(kv[0]))[:n]

    def checksum(self) -> int:
        text = "".join(
            p.replace(".", "").lstrip("0") + q.replace(".", "").lstrip("0")
            for p, q in self.best_asks(10) + self.best_bids(10)
        )
        return binascii.crc32(text.encode())


def book_frame(kind: str, bids, asks, checksum: int) -> str:
    def rows(levels: list[tuple[str, str]]) -> str:
        return ",".join(f'{{"price":{p},"qty":{q}}}' for p, q in levels)

    return (
        f'{{"channel":"book","type":"{kind}","data":[{{"symbol":"BTC/USD",'
        f'"bids":[{rows(bids)}],"asks":[{rows(asks)}],"checksum":{checksum}}}]}}'
    )


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([10, 25]),
    levels(BID_CENTS),
    levels(ASK_CENTS),
    st.lists(st.tuples(levels(BID_CENTS), levels(ASK_CENTS)), max_size=25),
)
def test_random_updates_keep_the_book_within_depth_and_its_checksum_right(
    depth: int, bids: list, asks: list, updates: list
) -> None:
    kraken, sync, model = Kraken(), KrakenSync(depth), Model(depth)
    model.apply(bids, asks)
    (snap,) = kraken.parse_book(book_frame("snapshot", bids, asks, model.checksum()))
    assert sync.on_snapshot(snap) is None
    for update_bids, update_asks in updates:
        model.apply(update_bids, update_asks)
        raw = book_frame("update", update_bids, update_asks, model.checksum())
        (update,) = kraken.parse_book(raw)
        assert sync.on_delta(update) is None
        assert len(sync.book) == len(model.bids) + len(model.asks) <= 2 * depth
        assert kraken_checksum(sync.book) == model.checksum()
        assert sync.book.bids() == [(Decimal(p), Decimal(q)) for p, q in model.best_bids(depth)]
        assert sync.book.asks() == [(Decimal(p), Decimal(q)) for p, q in model.best_asks(depth)]
