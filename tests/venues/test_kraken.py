"""Kraken v2 adapter: JSON-number prices read exactly (never via float), documented frames
-> exact events, malformed frames -> FeedError with the reason, symbols, subscribe frames."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tasks.core.codec import validate
from tasks.core.events import Quote, Trade
from tasks.venues import venue
from tasks.venues.base import FeedError
from tasks.venues.kraken import Kraken

FIXTURES = Path(__file__).parent / "fixtures" / "kraken"
RECV = 1_695_632_700_000_000  # 2023-09-25T09:05:00Z


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def kraken() -> Kraken:
    return Kraken()


EXPECTED = {
    "trade_update.json": [
        Trade("kraken", "MATIC-USD", "MATIC/USD", 4665906, Decimal("0.5117"), Decimal("40.0"),
              "buy", 1_695_628_177_708_706, RECV),
        # More digits than a float holds: kept exactly as written.
        Trade("kraken", "MATIC-USD", "MATIC/USD", 4665907, Decimal("0.5116"),
              Decimal("0.10000000000000000555"), "sell", 1_695_628_177_708_706, RECV),
    ],
    "trade_snapshot_xbt.json": [
        Trade("kraken", "BTC-USD", "XBT/USD", 69215041, Decimal("26112"), Decimal("1.2E-7"),
              "sell", 1_695_628_116_925_533, RECV),
    ],
    "trade_empty.json": [],
    "ticker_snapshot.json": [
        Quote("kraken", "ALGO-USD", "ALGO/USD", None, Decimal("0.10025"), Decimal("740.0"),
              Decimal("0.10036"), Decimal("1361.44813783"), 1_695_632_671_742_648, RECV),
    ],
    "ticker_update_no_timestamp.json": [
        Quote("kraken", "BTC-USD", "BTC/USD", None, Decimal("26110.1"), Decimal("0.5"),
              Decimal("26110.2"), Decimal("0"), RECV, RECV),
    ],
}  # fmt: skip

CONTROL = {
    "heartbeat.json": ("heartbeat", ""),
    "status.json": ("status", "system=online"),
    "subscribe_ack.json": ("ack", "subscribe {'channel': 'ticker'"),
    "subscribe_error.json": ("error", "subscribe: Currency pair not supported FOO/BAR"),
    "pong.json": ("pong", ""),
}

MALFORMED = {
    "bad_trade_nan_price.json": "kraken trade 'BTC/USD': price: not finite: 'NaN'",
    "bad_trade_infinite_qty.json": "kraken trade 'BTC/USD': qty: not finite: 'Infinity'",
    "bad_trade_negative_qty.json": "kraken trade 'BTC/USD': qty: must be > 0, got -1.5",
    "bad_trade_string_price.json": "kraken trade 'BTC/USD': price: not a number",
    "bad_trade_bool_price.json": "kraken: price: expected a decimal, got True",
    "bad_trade_missing_trade_id.json": "kraken trade: missing field 'trade_id'",
    "bad_trade_absurd_timestamp.json": "kraken trade 'BTC/USD': event_us: absurd timestamp 0",
    "bad_trade_unknown_side.json": "kraken: side: unknown side 'b'",
    "bad_trade_bad_symbol.json": "kraken: symbol: not a Kraken pair: 'BTCUSD'",
    "bad_ticker_missing_ask.json": "kraken ticker: missing field 'ask'",
    "bad_data_not_array.json": "kraken: data: expected an array",
    "bad_unknown_frame.json": "kraken: unknown frame, channel 'ohlc'",
    "bad_truncated.json": "kraken: not JSON: Expecting",
}


def test_every_fixture_has_an_expectation():
    named = set(EXPECTED) | set(CONTROL) | set(MALFORMED)
    assert {p.name for p in FIXTURES.glob("*.json")} == named


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_frames_become_exact_valid_events(kraken, name):
    parsed = kraken.parse(frame(name), RECV)
    assert parsed.control is None
    assert parsed.events == EXPECTED[name]
    for event, expected in zip(parsed.events, EXPECTED[name], strict=True):
        assert validate(event) == event
        # Same digits, not only the same value: 40.0 stays 40.0, never 40 or 40.00000001.
        for field in ("price", "qty", "bid_price", "bid_qty", "ask_price", "ask_qty"):
            if hasattr(event, field):
                assert str(getattr(event, field)) == str(getattr(expected, field))


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames(kraken, name):
    parsed = kraken.parse(frame(name), RECV)
    control, detail = CONTROL[name]
    assert (parsed.control, parsed.events) == (control, [])
    assert parsed.detail.startswith(detail)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_raise_feed_error_with_reason(kraken, name):
    with pytest.raises(FeedError) as exc:
        kraken.parse(frame(name), RECV)
    assert exc.value.reason.startswith(MALFORMED[name]), exc.value.reason


@pytest.mark.parametrize(
    ("pair", "canonical"),
    [
        ("BTC/USD", "BTC-USD"),
        ("XBT/USD", "BTC-USD"),
        ("XDG/EUR", "DOGE-EUR"),
        ("ETH/XBT", "ETH-BTC"),
    ],
)
def test_pairs_map_to_canonical(kraken, pair, canonical):
    assert kraken.to_canonical(pair) == canonical


def test_canonical_maps_to_v2_pairs(kraken):
    assert kraken.to_venue_symbol("BTC-USD") == "BTC/USD"
    assert kraken.to_venue_symbol("eth-eur") == "ETH/EUR"
    with pytest.raises(ValueError, match="not a canonical symbol"):
        kraken.to_venue_symbol("BTC/USD")
    with pytest.raises(ValueError, match="not a Kraken pair"):
        kraken.to_canonical("BTCUSD")


def test_subscribe_frames_use_bbo_ticker_for_quotes():
    k = venue("kraken")
    assert k.connection_url(["BTC-USD"], ["trades"]) == "wss://ws.kraken.com/v2"
    frames = [
        json.loads(f) for f in k.subscribe_frames(["BTC-USD", "ETH-EUR"], ["trades", "quotes"])
    ]
    assert frames == [
        {"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/USD", "ETH/EUR"]},
         "req_id": 1},
        {"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD", "ETH/EUR"],
                                           "event_trigger": "bbo"}, "req_id": 2},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown channel"):
        k.subscribe_frames(["BTC-USD"], ["book"])
