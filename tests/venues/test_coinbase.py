"""Coinbase Advanced Trade adapter: documented frames -> exact events (maker side flipped
to the taker's), malformed frames -> FeedError with the reason, subscribe frames."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tasks.core.codec import validate
from tasks.core.events import Quote, Trade
from tasks.venues import venue
from tasks.venues.base import FeedError
from tasks.venues.coinbase import Coinbase

FIXTURES = Path(__file__).parent / "fixtures" / "coinbase"
RECV = 1_675_974_000_000_000  # 2023-02-09T20:20:00Z


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def coinbase() -> Coinbase:
    return Coinbase()


EXPECTED = {
    "market_trades_snapshot.json": [
        # side BUY = a resting buy was hit = the taker sold.
        Trade("coinbase", "ETH-USD", "ETH-USD", 0, Decimal("1260.01"), Decimal("0.3"), "sell",
              1_565_815_347_265_000, RECV),
        Trade("coinbase", "ETH-USD", "ETH-USD", 1, Decimal("1260.02"), Decimal("1.25000000"),
              "buy", 1_565_815_347_265_123, RECV),  # nanoseconds truncated to microseconds
    ],
    "market_trades_update.json": [
        Trade("coinbase", "BTC-USD", "BTC-USD", 573094841, Decimal("21932.98"),
              Decimal("0.00012345"), "buy", 1_675_973_975_812_345, RECV),
    ],
    "market_trades_empty.json": [],
    "market_trades_offset_time.json": [
        Trade("coinbase", "BTC-USD", "BTC-USD", 573094842, Decimal("21933"), Decimal("2"),
              "sell", 1_675_973_975_500_000, RECV),  # -05:00 offset applied
    ],
    "ticker.json": [
        Quote("coinbase", "BTC-USD", "BTC-USD", 7, Decimal("21931.98"), Decimal("8000.21"),
              Decimal("21933.98"), Decimal("8038.07770938"), 1_675_974_637_167_359, RECV),
    ],
}  # fmt: skip

CONTROL = {
    "heartbeats.json": ("heartbeat", "counter=3049"),
    "subscriptions.json": ("ack", '{"market_trades": ["BTC-USD", "ETH-USD"]}'),
    "error.json": ("error", "failure to subscribe"),
}

MALFORMED = {
    "bad_trade_nan_price.json": "coinbase market_trades 'BTC-USD': price: not finite: 'NaN'",
    "bad_trade_negative_size.json": "coinbase market_trades 'BTC-USD': qty: must be > 0",
    "bad_trade_nonnumeric_price.json": "coinbase market_trades 'BTC-USD': price: not a number",
    "bad_trade_missing_time.json": "coinbase market_trades: missing field 'time'",
    "bad_trade_unparseable_time.json": "coinbase: time: no such date: '2023-02-30T20:19:35Z'",
    "bad_trade_absurd_time.json": "coinbase market_trades 'BTC-USD': event_us: absurd timestamp",
    "bad_trade_unknown_side.json": "coinbase: side: unknown side 'UNKNOWN_ORDER_SIDE'",
    "bad_trade_id_not_digits.json": "coinbase: trade_id: expected digits, got '7f3a'",
    "bad_ticker_missing_best_ask.json": "coinbase ticker: missing field 'best_ask'",
    "bad_events_not_array.json": "coinbase: events: expected an array",
    "bad_unknown_channel.json": "coinbase: unknown frame, channel 'level2'",
    "bad_truncated.json": "coinbase: not JSON: Unterminated string",
}


def test_every_fixture_has_an_expectation():
    named = set(EXPECTED) | set(CONTROL) | set(MALFORMED)
    assert {p.name for p in FIXTURES.glob("*.json")} == named


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_frames_become_exact_valid_events(coinbase, name):
    parsed = coinbase.parse(frame(name), RECV)
    assert parsed.control is None
    assert parsed.events == EXPECTED[name]
    for event in parsed.events:
        assert validate(event) == event


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames(coinbase, name):
    parsed = coinbase.parse(frame(name), RECV)
    assert (parsed.control, parsed.detail, parsed.events) == (*CONTROL[name], [])


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_raise_feed_error_with_reason(coinbase, name):
    with pytest.raises(FeedError) as exc:
        coinbase.parse(frame(name), RECV)
    assert exc.value.reason.startswith(MALFORMED[name]), exc.value.reason


def test_one_frame_carries_many_trades_and_one_bad_trade_rejects_the_frame(coinbase):
    msg = json.loads(frame("market_trades_snapshot.json"))
    assert len(coinbase.parse(json.dumps(msg), RECV).events) == 2
    msg["events"][0]["trades"][1]["size"] = "0"
    with pytest.raises(FeedError, match="qty: must be > 0"):
        coinbase.parse(json.dumps(msg), RECV)


def test_a_snapshot_newest_first_is_handed_over_in_id_order(coinbase):
    msg = json.loads(frame("market_trades_snapshot.json"))
    msg["events"][0]["trades"].reverse()  # as Coinbase lists a snapshot: newest first
    parsed = coinbase.parse(json.dumps(msg), RECV)
    assert parsed.events == EXPECTED["market_trades_snapshot.json"]


@pytest.mark.parametrize(
    ("name", "sequence"),
    [("market_trades_update.json", 4), ("ticker.json", 7), ("heartbeats.json", 0),
     ("subscriptions.json", 1), ("error.json", None)],
)  # fmt: skip
def test_every_numbered_frame_carries_its_sequence_num(coinbase, name, sequence):
    assert coinbase.parse(frame(name), RECV).sequence == sequence


@pytest.mark.parametrize("symbol", ["BTC-USD", "ETH-EUR", "USDT-USDC"])
def test_product_ids_are_canonical_both_ways(coinbase, symbol):
    assert coinbase.to_venue_symbol(symbol) == symbol
    assert coinbase.to_canonical(symbol.lower()) == symbol


@pytest.mark.parametrize("bad", ["BTCUSD", "BTC-", "BTC-USD-X"])
def test_non_product_ids_are_refused(coinbase, bad):
    with pytest.raises(ValueError, match="not a product id"):
        coinbase.to_canonical(bad)


def test_subscribe_frames_one_per_channel_plus_heartbeats():
    cb = venue("coinbase")
    assert cb.connection_url(["BTC-USD"], ["trades"]) == "wss://advanced-trade-ws.coinbase.com"
    frames = [
        json.loads(f) for f in cb.subscribe_frames(["BTC-USD", "eth-usd"], ["trades", "quotes"])
    ]
    assert frames == [
        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channel": channel}
        for channel in ("market_trades", "ticker", "heartbeats")
    ]
    with pytest.raises(ValueError, match="unknown channel"):
        cb.subscribe_frames(["BTC-USD"], ["level2"])
