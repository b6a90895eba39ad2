"""Binance adapter: documented frames -> exact events, malformed frames -> FeedError with
the reason an operator will read in the DLQ, symbols both ways, sharding and subscribing."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from tasks.core.codec import validate
from tasks.core.events import Quote, Trade
from tasks.venues import default_config, venue
from tasks.venues.base import FeedError, VenueConfig
from tasks.venues.binance import Binance

FIXTURES = Path(__file__).parent / "fixtures" / "binance"
RECV = 1_672_515_782_500_123  # epoch microseconds, after every fixture's event time


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def binance() -> Binance:
    return Binance()


EXPECTED = {
    "trade_combined.json": [
        Trade("binance", "BTC-USDT", "BTCUSDT", 12345, Decimal("16500.01000000"),
              Decimal("0.00100000"), "sell", 1_672_515_782_134_000, RECV),
    ],
    "trade_raw_taker_buy.json": [
        Trade("binance", "ETH-BTC", "ETHBTC", 12346, Decimal("0.07312000"),
              Decimal("1.25000000"), "buy", 1_672_515_782_199_000, RECV),
    ],
    "book_ticker_combined.json": [
        Quote("binance", "BNB-USDT", "BNBUSDT", 400900217, Decimal("25.35190000"),
              Decimal("31.21000000"), Decimal("25.36520000"), Decimal("40.66000000"), RECV, RECV),
    ],
    "book_ticker_raw.json": [
        Quote("binance", "BTC-FDUSD", "BTCFDUSD", 400900218, Decimal("16499.99000000"),
              Decimal("0.00000000"), Decimal("16500.00000000"), Decimal("2.50000000"), RECV, RECV),
    ],
    "book_ticker_with_times.json": [
        Quote("binance", "BNB-USDT", "BNBUSDT", 400900219, Decimal("25.35190000"),
              Decimal("31.21000000"), Decimal("25.36520000"), Decimal("40.66000000"),
              1_672_515_782_130_000, RECV),
    ],
}  # fmt: skip

CONTROL = {
    "subscribe_ack.json": ("ack", "id=1"),
    "list_subscriptions.json": ("ack", "id=3"),
    "error.json": ("error", "id=7 2: Invalid request: unknown variant `SUBSCRIB`"),
    "server_shutdown.json": ("server_shutdown", "E=1672515782136"),
    "server_shutdown_envelope.json": ("server_shutdown", "E=1672515782136"),
}

MALFORMED = {
    "bad_trade_nan_price.json": "binance trade 'BTCUSDT': price: not finite: 'NaN'",
    "bad_trade_negative_price.json": "binance trade 'BTCUSDT': price: must be > 0",
    "bad_trade_nonnumeric_price.json": "binance trade 'BTCUSDT': price: not a number: '16,500.01'",
    "bad_trade_number_price.json": "binance trade 'BTCUSDT': price: expected a decimal string",
    "bad_trade_missing_qty.json": "binance trade: missing field 'q'",
    "bad_trade_absurd_time.json": "binance trade 'BTCUSDT': event_us: absurd timestamp",
    "bad_trade_time_as_string.json": "binance: T: expected integer epoch milliseconds",
    "bad_trade_unknown_side.json": "binance: m: expected true or false, got 'true'",
    "bad_trade_unknown_symbol.json": "binance: s: no known quote asset ends 'FOOBAR'",
    "bad_trade_negative_id.json": "binance trade 'BTCUSDT': trade_id: expected a non-negative",
    "bad_book_ticker_zero_bid.json": "binance bookTicker 'BNBUSDT': bid_price: must be > 0",
    "bad_envelope_data_not_object.json": "binance: envelope data is not an object",
    "bad_unknown_event.json": "binance: unknown frame with keys ['E', 'M', 'T', 'a'",
    "bad_not_an_object.json": "binance: expected a JSON object, got list",
    "bad_truncated.json": "binance: not JSON: Unterminated string",
}


def test_every_fixture_has_an_expectation():
    named = set(EXPECTED) | set(CONTROL) | set(MALFORMED)
    assert {p.name for p in FIXTURES.glob("*.json")} == named


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_frames_become_exact_valid_events(binance, name):
    parsed = binance.parse(frame(name), RECV)
    assert parsed.control is None
    assert parsed.events == EXPECTED[name]
    for event in parsed.events:
        assert validate(event) == event


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames(binance, name):
    parsed = binance.parse(frame(name), RECV)
    control, detail = CONTROL[name]
    assert (parsed.control, parsed.events) == (control, [])
    assert parsed.detail.startswith(detail)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_raise_feed_error_with_reason(binance, name):
    with pytest.raises(FeedError) as exc:
        binance.parse(frame(name), RECV)
    assert exc.value.reason.startswith(MALFORMED[name]), exc.value.reason


def test_bytes_frames_parse_like_text(binance):
    raw = frame("trade_combined.json")
    assert binance.parse(raw.encode(), RECV) == binance.parse(raw, RECV)
    with pytest.raises(FeedError, match="not JSON"):
        binance.parse(b"\xff" + raw.encode(), RECV)


@pytest.mark.parametrize(
    ("venue_symbol", "canonical"),
    [
        ("BTCUSDT", "BTC-USDT"),
        ("btcusdt", "BTC-USDT"),
        ("ETHBTC", "ETH-BTC"),
        ("BTCFDUSD", "BTC-FDUSD"),  # not BTCFD-USD
        ("BTCTUSD", "BTC-TUSD"),
        ("USDCUSDT", "USDC-USDT"),
        ("USDTTRY", "USDT-TRY"),
        ("BNBEUR", "BNB-EUR"),
        ("1000SATSUSDT", "1000SATS-USDT"),
        ("BTCUSD", "BTC-USD"),  # Binance US
    ],
)
def test_symbols_map_both_ways(binance, venue_symbol, canonical):
    assert binance.to_canonical(venue_symbol) == canonical
    assert binance.to_venue_symbol(canonical) == venue_symbol.upper()


def test_subscribed_symbols_map_back_exactly_even_when_the_suffix_rule_is_ambiguous():
    fresh = Binance(default_config("binanceus"))
    assert fresh.to_canonical("USDTUSD") == "USD-TUSD"  # what the suffix rule alone says
    asked = Binance(default_config("binanceus"))
    assert asked.to_venue_symbol("USDT-USD") == "USDTUSD"
    assert asked.to_canonical("USDTUSD") == "USDT-USD"


@pytest.mark.parametrize("bad", ["BTCUSDT", "BTC-", "-USDT", "BTC-USD-T"])
def test_non_canonical_symbols_are_refused(binance, bad):
    with pytest.raises(ValueError, match="not a canonical symbol"):
        binance.to_venue_symbol(bad)


def test_connection_url_subscribes_combined_streams(binance):
    url = binance.connection_url(["BTC-USDT", "ETH-BTC"], ["trades", "quotes"])
    assert url == (
        "wss://stream.binance.com:9443/stream?streams="
        "btcusdt@trade/btcusdt@bookTicker/ethbtc@trade/ethbtc@bookTicker"
    )
    assert binance.subscribe_frames(["BTC-USDT"], ["trades"]) == []


def test_binance_us_and_the_simulator_are_only_other_configs():
    us = venue("binanceus")
    assert isinstance(us, Binance) and us.config.name == "binanceus"
    assert us.connection_url(["BTC-USD"], ["trades"]) == (
        "wss://stream.binance.us:9443/stream?streams=btcusd@trade"
    )
    sim = venue(
        "binance", VenueConfig("binance", "ws://127.0.0.1:18765/", "http://127.0.0.1:18765")
    )
    assert sim.connection_url(["BTC-USDT"], ["quotes"]) == (
        "ws://127.0.0.1:18765/stream?streams=btcusdt@bookTicker"
    )
    event = us.parse(frame("trade_combined.json"), RECV).events[0]
    assert event.venue == "binanceus"


def test_shards_respect_the_stream_limit(binance):
    symbols = [f"C{i}-USDT" for i in range(1500)]
    shards = binance.shards(symbols, ["trades", "quotes"])
    assert [len(s) for s in shards] == [512, 512, 476]  # 1024 streams per connection
    assert [s for shard in shards for s in shard] == symbols
    for shard in shards:
        assert len(binance.streams(shard, ["trades", "quotes"])) <= 1024
        binance.connection_url(shard, ["trades", "quotes"])  # accepted


def test_shard_size_only_shrinks_connections(binance):
    symbols = ["BTC-USDT", "ETH-USDT", "BTC-USDT", "SOL-USDT", "BNB-USDT", "XRP-USDT"]
    assert binance.shards(symbols, ["trades"], shard_size=2) == [
        ["BTC-USDT", "ETH-USDT"], ["SOL-USDT", "BNB-USDT"], ["XRP-USDT"],
    ]  # fmt: skip
    assert len(binance.shards(symbols * 400, ["trades"], shard_size=5000)[0]) == 5
    small = Binance(VenueConfig("binance", "ws://x", "http://x", max_streams_per_connection=4))
    assert small.shards(symbols, ["trades", "quotes"], shard_size=10) == [
        ["BTC-USDT", "ETH-USDT"], ["SOL-USDT", "BNB-USDT"], ["XRP-USDT"],
    ]  # fmt: skip
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        binance.shards(symbols, ["trades"], shard_size=0)


def test_connection_over_the_limit_is_refused(binance):
    symbols = [f"C{i}-USDT" for i in range(513)]
    with pytest.raises(ValueError, match="1026 streams exceed 1024 per connection"):
        binance.connection_url(symbols, ["trades", "quotes"])
    with pytest.raises(ValueError, match="unknown channel 'depth'"):
        binance.connection_url(["BTC-USDT"], ["depth"])


def test_subscription_frames_batch_streams_with_increasing_ids(binance):
    frames = binance.subscription_frames(
        ["BTC-USDT", "ETH-BTC"], ["trades", "quotes"], first_id=10, per_frame=3
    )
    assert [json.loads(f) for f in frames] == [
        {"method": "SUBSCRIBE", "params": ["btcusdt@trade", "btcusdt@bookTicker", "ethbtc@trade"],
         "id": 10},
        {"method": "SUBSCRIBE", "params": ["ethbtc@bookTicker"], "id": 11},
    ]  # fmt: skip
    (unsub,) = binance.subscription_frames(["BTC-USDT"], ["trades"], unsubscribe=True)
    assert json.loads(unsub) == {"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 1}
    assert binance.config.subscribe_rate_per_s == 5.0
