"""Finnhub adapter: documented frames -> exact events with side "unknown" and a content
hash as trade id (the same for a repeated or replayed trade, so the sinks store it once),
malformed frames -> FeedError with the reason (and nothing else, whatever the input),
symbols <-> canonical both ways, the token kept out of every log line, repr and error, a
quiet market's pings keeping the connection, and REST candles against a local server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.sync.server import ServerConnection, serve

import blocks
from simulator.venues import finnhub as sim_finnhub
from tasks import venues
from tasks.core import config
from tasks.core.codec import MAX_ID, validate
from tasks.core.events import Trade
from tasks.drain.postgres import trade_line
from tasks.ingest.live import plan
from tasks.telemetry.verify import SymbolCheck, Verdict, sequential
from tasks.venues.base import FeedError, VenueConfig, redact
from tasks.venues.connection import Connection, ConnectionPolicy
from tasks.venues.finnhub import (
    SIMULATOR_TOKEN,
    TOKEN_HEADER,
    Finnhub,
    FinnhubRest,
    dedupe_key,
)
from tasks.venues.http import Http, RestError

FIXTURES = Path(__file__).parent / "fixtures" / "finnhub"
RECV = 1_700_000_000_500_000
TOKEN = "s3cr3t/Tok+en%"  # URL-reserved characters: the encoded form must not leak either


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def finnhub() -> Finnhub:
    return Finnhub()


def trade(symbol, name, price, qty, t_ms, conditions=()) -> Trade:
    key = dedupe_key(name, t_ms, price, qty, tuple(conditions))
    return Trade(
        "finnhub", symbol, name, key, Decimal(price), Decimal(qty), "unknown", t_ms * 1000, RECV
    )


DOC = trade("BTC-USDTBINANCE", "BINANCE:BTCUSDT", "7296.89", "0.011467", 1575526691134, ["1", "12"])
EXPECTED = {
    "trade.json": [DOC],
    "trades_batch.json": [
        trade("AAPL-USD", "AAPL", "189.8400", "100", 1700000000123, ["1", "24", "12"]),
        # more digits than a float holds, exactly as written
        trade("ETH-USDCOINBASE", "COINBASE:ETH-USD", "2300.123456789012345678", "0.00000001",
              1700000000124),
        trade("EUR-USDOANDA", "OANDA:EUR_USD", "1.08514", "1000000", 1700000000125),
    ],
    # The venue sending one trade twice (conditions reordered, trailing zeros): one key.
    "trades_duplicate.json": [
        DOC,
        Trade("finnhub", "BTC-USDTBINANCE", "BINANCE:BTCUSDT", DOC.trade_id,
              Decimal("7296.890"), Decimal("0.0114670"), "unknown", DOC.event_us, RECV),
    ],
    "trades_empty.json": [],
}  # fmt: skip

CONTROL = {
    "ping.json": ("heartbeat", "ping"),
    "error.json": ("error", "Subscribing to too many symbols"),
}

MALFORMED = {
    "bad_truncated.json": "finnhub: not JSON:",
    "bad_not_object.json": "finnhub: expected a JSON object, got list",
    "bad_unknown_type.json": "finnhub: unknown frame type 'news'",
    "bad_data_object.json": "finnhub: data: expected an array",
    "bad_trade_missing_price.json": "finnhub trade: missing field 'p'",
    "bad_trade_nan_price.json": "finnhub trade 'BINANCE:BTCUSDT': price: not finite: 'NaN'",
    "bad_trade_string_price.json": "finnhub trade 'AAPL': price: not a number: 'n/a'",
    "bad_trade_float_time.json": "finnhub: t: expected integer epoch milliseconds",
    "bad_trade_bool_volume.json": "finnhub: v: expected a decimal, got True",
    "bad_trade_unmapped_exchange.json": "finnhub: s: not a Finnhub symbol: 'KRAKEN:XXBTZUSD'",
    "bad_trade_conditions_object.json": "finnhub: c: expected a list of trade conditions",
    "bad_trade_zero_volume.json": "finnhub trade 'AAPL': qty: must be > 0, got 0",
    "bad_trade_huge_price.json": "finnhub trade 'AAPL': price: magnitude out of range",
    "bad_trade_symbol_list.json": "finnhub: s: expected a symbol, got ['AAPL']",
}


def test_every_fixture_has_an_expectation():
    named = set(EXPECTED) | set(CONTROL) | set(MALFORMED)
    assert {p.name for p in FIXTURES.glob("*.json")} == named


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_frames_become_exact_valid_events(finnhub, name):
    parsed = finnhub.parse(frame(name), RECV)
    assert (parsed.control, parsed.reply) == (None, None)
    assert parsed.events == EXPECTED[name]
    for event, expected in zip(parsed.events, EXPECTED[name], strict=True):
        assert validate(event) == event
        assert (str(event.price), str(event.qty)) == (str(expected.price), str(expected.qty))
        assert event.side == "unknown"


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames(finnhub, name):
    parsed = finnhub.parse(frame(name), RECV)
    assert (parsed.control, parsed.detail, parsed.events, parsed.reply) == (
        *CONTROL[name],
        [],
        None,
    )


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_raise_feed_error_with_reason(finnhub, name):
    with pytest.raises(FeedError) as exc:
        finnhub.parse(frame(name), RECV)
    assert exc.value.reason.startswith(MALFORMED[name]), exc.value.reason


# -- property: parse raises FeedError or nothing, on anything ------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_symbols = st.sampled_from(
    ["AAPL", "BINANCE:BTCUSDT", "COINBASE:BTC-USD", "OANDA:EUR_USD", "KRAKEN:X", "BINANCE:",
     "aapl", "BRK.B", ":", "Ω", "BINANCE:USDT", "COINBASE:A-B-C", "\ud800"]
)  # fmt: skip
_trade_fields = st.fixed_dictionaries(
    {},
    optional={
        "p": _json | st.decimals(allow_nan=True).map(str),
        "v": _json | st.integers(min_value=-1, max_value=2**70),
        "t": _json | st.integers(min_value=0, max_value=2**50),
        "s": _json | _symbols,
        "c": _json | st.lists(st.text(max_size=3) | st.integers(), max_size=3),
    },
)  # fmt: skip
_frames = st.one_of(
    _json.map(json.dumps),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.builds(
        lambda kind, data: json.dumps({"type": kind, "data": data}),
        st.sampled_from(["trade", "ping", "error"]) | _json,
        st.lists(_trade_fields, max_size=3) | _trade_fields | _json,
    ),
    st.builds(lambda msg: json.dumps({"type": "error", "msg": msg}), _json),
)


@settings(max_examples=500, deadline=None)
@given(_frames)
def test_parse_raises_only_feed_error(raw):
    f = Finnhub()
    f.subscribe_frames(["BTC-USDTBINANCE", "AAPL-USD"], ["trades"])
    try:
        parsed = f.parse(raw, RECV)
    except FeedError:
        return
    for event in parsed.events:
        assert validate(event) == event
        assert 0 <= event.trade_id <= MAX_ID and event.side == "unknown"


# -- the dedupe key -----------------------------------------------------------------------


def test_the_key_is_pinned_so_a_restarted_ingestion_makes_the_same_ids():
    """The key is stored: changing how it is computed would store every replayed trade
    again under a new id."""
    assert DOC.trade_id == 3846494743460262951


def test_a_replayed_or_repeated_frame_gives_the_same_keys_so_each_trade_is_stored_once():
    """The sinks key trades by (venue, symbol, trade_id) (the trades table's primary key;
    the drain inserts ON CONFLICT DO NOTHING): a frame the venue repeats, the same frame
    read again after a reconnect, and a trade published twice end as one row each."""
    first = Finnhub().parse(frame("trades_batch.json"), RECV).events
    again = Finnhub().parse(frame("trades_batch.json"), RECV + 5_000_000).events  # replay
    repeated = Finnhub().parse(frame("trades_duplicate.json"), RECV).events  # venue dup
    assert [t.trade_id for t in first] == [t.trade_id for t in again]
    assert len({t.trade_id for t in repeated}) == 1 and repeated[0].trade_id == DOC.trade_id
    table: dict[tuple, bytes] = {}
    for t in [*first, *again, *repeated, *first]:
        table.setdefault((t.venue, t.symbol, t.trade_id), trade_line(t))
    assert len(table) == 4
    assert len({(t.symbol, t.trade_id) for t in first}) == 3  # distinct trades stay apart


@pytest.mark.parametrize(
    "change",
    [
        {"name": "BINANCE:ETHUSDT"},
        {"t_ms": 1575526691135},
        {"price": "7296.88"},
        {"qty": "0.011468"},
        {"conditions": ("1",)},
        {"conditions": ()},
    ],
)
def test_any_difference_in_content_makes_another_key(change):
    base = {
        "name": "BINANCE:BTCUSDT", "t_ms": 1575526691134, "price": "7296.89",
        "qty": "0.011467", "conditions": ("1", "12"),
    }  # fmt: skip
    other = base | change
    assert dedupe_key(*base.values()) != dedupe_key(*other.values())


def test_numbers_count_by_value_and_conditions_by_set():
    k = dedupe_key("AAPL", 1, "189.84", "100", ("12", "1"))
    assert k == dedupe_key("AAPL", 1, "189.840", "100.0", ("1", "12"))
    assert k == dedupe_key("AAPL", 1, "1.8984E+2", "1E+2", ("1", "12"))
    assert dedupe_key("AAPL", 1, "1" + "0" * 40 + "1", "1", ()) != dedupe_key(
        "AAPL", 1, "1" + "0" * 41, "1", ()
    )  # past Decimal's 28-digit context: no rounding
    absent = Finnhub().parse(
        '{"type":"trade","data":[{"p":1,"s":"AAPL","t":1700000000000,"v":1}]}', RECV
    )
    null = Finnhub().parse(
        '{"type":"trade","data":[{"p":1,"s":"AAPL","t":1700000000000,"v":1,"c":null}]}', RECV
    )
    assert absent.events == null.events


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=20), st.integers(0, 2**64), st.decimals(allow_nan=False).map(str),
    st.decimals(allow_nan=False).map(str), st.lists(st.text(max_size=4), max_size=4),
)  # fmt: skip
def test_keys_are_in_the_range_the_codec_and_bigint_accept(name, t, price, qty, conditions):
    assert 0 <= dedupe_key(name, t, price, qty, tuple(conditions)) <= MAX_ID


# -- symbols and subscribing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("AAPL", "AAPL-USD"),
        ("BINANCE:BTCUSDT", "BTC-USDTBINANCE"),
        ("BINANCE:ETHBTC", "ETH-BTCBINANCE"),
        ("BINANCE:1000SATSFDUSD", "1000SATS-FDUSDBINANCE"),
        ("COINBASE:BTC-USD", "BTC-USDCOINBASE"),
        ("OANDA:EUR_USD", "EUR-USDOANDA"),
        ("FXCM:EUR/USD", "EUR-USDFXCM"),
    ],
)
def test_symbols_map_both_ways(finnhub, name, canonical):
    assert finnhub.to_canonical(name) == canonical
    assert Finnhub().to_venue_symbol(canonical) == name
    assert Finnhub().to_venue_symbol(canonical.lower()) == name
    assert Finnhub().to_canonical(Finnhub().to_venue_symbol(canonical)) == canonical


def test_an_ambiguous_concatenated_pair_keeps_the_spelling_asked_for():
    f = Finnhub()
    assert f.to_venue_symbol("AB-TUSDBINANCE") == "BINANCE:ABTUSD"
    assert f.to_canonical("BINANCE:ABTUSD") == "AB-TUSDBINANCE"
    f2 = Finnhub()
    assert f2.to_venue_symbol("ABT-USDBINANCE") == "BINANCE:ABTUSD"
    assert f2.to_canonical("BINANCE:ABTUSD") == "ABT-USDBINANCE"


@pytest.mark.parametrize(
    "symbol", ["BTC-USDT", "BRK.B-USD", "BTC", "BTC-BINANCE", "-USD", "AAPL-USDX", "1AAPL-USD"]
)
def test_canonical_symbols_it_cannot_map_are_refused(finnhub, symbol):
    with pytest.raises(ValueError):
        finnhub.to_venue_symbol(symbol)


@pytest.mark.parametrize(
    "name", ["KRAKEN:XBTUSD", "BINANCE:BTC", "OANDA:EURUSD", "COINBASE:A-B-C", "aapl", "BRK.B", ""]
)
def test_venue_symbols_it_cannot_map_are_refused(finnhub, name):
    with pytest.raises(ValueError):
        finnhub.to_canonical(name)


def test_subscribe_and_unsubscribe_one_frame_per_symbol_trades_only():
    f = venues.venue("finnhub")
    assert f.channels == ("trades",)
    frames = [
        json.loads(x) for x in f.subscribe_frames(["AAPL-USD", "BTC-USDTBINANCE"], ["trades"])
    ]
    assert frames == [
        {"type": "subscribe", "symbol": "AAPL"},
        {"type": "subscribe", "symbol": "BINANCE:BTCUSDT"},
    ]
    assert [json.loads(x) for x in f.unsubscribe_frames(["AAPL-USD"])] == [
        {"type": "unsubscribe", "symbol": "AAPL"}
    ]
    with pytest.raises(ValueError, match="unknown channel 'quotes'"):
        f.subscribe_frames(["AAPL-USD"], ["trades", "quotes"])


def test_registry_entry():
    spec = venues.spec("finnhub")
    assert not spec.sequential_ids and spec.klines and not spec.trade_history
    assert venues.gap_history("finnhub") is None
    assert isinstance(venues.klines_client("finnhub"), FinnhubRest)
    assert venues.rest_client("finnhub").http.min_interval_s >= 1.0  # 60 calls a minute
    with pytest.raises(ValueError, match="no trade history"):
        venues.trades_client("finnhub")
    with pytest.raises(RestError, match="backfill_candles"):
        list(FinnhubRest().trades_by_time("AAPL-USD", 0, 1))
    cfg = venues.venue_config("finnhub", "http://127.0.0.1:18765", credential=TOKEN)
    assert (cfg.name, cfg.ws_url, cfg.rest_url, cfg.credential) == (
        "finnhub-sim", "ws://127.0.0.1:18765/finnhub", "http://127.0.0.1:18765", SIMULATOR_TOKEN
    )  # fmt: skip
    assert SIMULATOR_TOKEN == sim_finnhub.TOKEN  # the simulator accepts what we send it


def test_a_quiet_market_is_not_a_stall_the_watchdog_waits_past_the_pings():
    assert venues.stall_timeout("finnhub", 30.0) == venues.spec("finnhub").min_stall_timeout_s
    assert venues.stall_timeout("finnhub", 600.0) == 600.0
    assert venues.stall_timeout("binance", 30.0) == 30.0


def test_the_plan_takes_trades_only_and_needs_a_token():
    p = plan("finnhub", ["AAPL-USD", "BTC-USDTBINANCE"], None, credential=TOKEN)
    assert p.channels == ("trades",) and p.config.credential == TOKEN
    with pytest.raises(ValueError, match="needs an API token"):
        plan("finnhub", ["AAPL-USD"], None)
    sim = plan("finnhub", ["AAPL-USD"], None, simulator_url="http://127.0.0.1:1")
    assert sim.config.credential == SIMULATOR_TOKEN
    assert plan("binance", ["BTC-USDT"], None).channels == ("trades", "quotes")


# -- the token never shows ------------------------------------------------------------------


def test_the_token_is_in_the_url_and_nowhere_else():
    cfg = venues.venue_config("finnhub", credential=TOKEN)
    adapter = venues.venue("finnhub", cfg)
    url = adapter.connection_url(["AAPL-USD"], ["trades"])
    assert url == "wss://ws.finnhub.io?token=s3cr3t%2FTok%2Ben%25"
    p = plan("finnhub", ["AAPL-USD"], None, credential=TOKEN)
    for text in (repr(cfg), str(cfg), repr(p), repr(venues.spec("finnhub")), p.config.ws_url):
        assert TOKEN not in text and "s3cr3t" not in text
    assert "s3cr3t" not in redact(f"GET {url} failed", TOKEN)
    assert "s3cr3t" not in redact(f"redirect to {url}")  # no secret given: by the parameter
    with pytest.raises(ValueError, match="TAPELINE_FINNHUB_TOKEN"):
        Finnhub().connection_url(["AAPL-USD"], ["trades"])


def test_an_error_frame_quoting_the_token_is_redacted():
    adapter = Finnhub(VenueConfig("finnhub", "wss://x", "https://x", credential=TOKEN))
    parsed = adapter.parse(json.dumps({"type": "error", "msg": f"bad key {TOKEN}"}), RECV)
    assert parsed.control == "error" and "s3cr3t" not in parsed.detail


def test_the_token_comes_from_the_environment_or_a_secret_block(monkeypatch):
    assert config.secret_var("finnhub-token") == "TAPELINE_FINNHUB_TOKEN"
    assert "TAPELINE_FINNHUB_TOKEN" in config.SECRET_VARS
    monkeypatch.setenv("TAPELINE_FINNHUB_TOKEN", f" {TOKEN} ")
    assert blocks.venue_credential("finnhub") == TOKEN
    assert blocks.venue_credential("finnhub", "http://127.0.0.1:1") == ""  # never to the sim
    assert blocks.venue_credential("binance") == ""
    monkeypatch.delenv("TAPELINE_FINNHUB_TOKEN")
    import prefect.blocks.system

    def no_block(name):
        raise ValueError(f"Unable to find block document named {name}")

    monkeypatch.setattr(prefect.blocks.system.Secret, "load", staticmethod(no_block))
    with pytest.raises(ValueError) as missing:
        blocks.venue_credential("finnhub")
    assert "TAPELINE_FINNHUB_TOKEN" in str(missing.value) and "finnhub-token" in str(missing.value)


def _refusing_server() -> tuple[object, str]:
    """A WebSocket server that refuses every handshake with 401, as Finnhub a bad token."""

    def refuse(conn, request):
        return Response(401, "Unauthorized", Headers([("Content-Length", "0")]), b"")

    server = serve(lambda ws: None, "127.0.0.1", 0, process_request=refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"ws://127.0.0.1:{server.socket.getsockname()[1]}"


def ours(caplog) -> str:
    """What our code logged (the test's own server logs the request line it received)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("tasks."))


def _run_briefly(conn: Connection, seconds: float) -> None:
    reader = threading.Thread(target=conn.run, daemon=True)
    reader.start()
    time.sleep(seconds)
    conn.stop()
    reader.join(10)


def test_a_refused_handshake_is_logged_without_the_token(caplog):
    server, url = _refusing_server()
    try:
        adapter = Finnhub(VenueConfig("finnhub", url, "http://127.0.0.1:1", credential=TOKEN))
        conn = Connection(adapter, ["AAPL-USD"], ["trades"], lambda raw, us: None,
                          policy=ConnectionPolicy(backoff_s=0.05, max_backoff_s=0.1))  # fmt: skip
        with caplog.at_level(logging.DEBUG):
            _run_briefly(conn, 0.6)
    finally:
        server.shutdown()
    assert conn.reconnects["connect_failed"] >= 1
    assert "401" in ours(caplog)
    assert "s3cr3t" not in ours(caplog)


def test_errors_quoting_the_url_are_logged_without_the_token(caplog, monkeypatch):
    """Whatever an error says (a redirect target, a proxy failure, a handler bug), the
    connection's log lines carry no token."""
    import tasks.venues.connection as connection

    def fail(url, **kwargs):
        raise RuntimeError(f"cannot connect to {url}")

    monkeypatch.setattr(connection.websocket, "create_connection", fail)
    adapter = Finnhub(VenueConfig("finnhub", "wss://x", "http://x", credential=TOKEN))
    conn = Connection(adapter, ["AAPL-USD"], ["trades"], lambda raw, us: None,
                      policy=ConnectionPolicy(backoff_s=0.05, max_backoff_s=0.1))  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        _run_briefly(conn, 0.3)
    assert "cannot connect to wss://x?token=***" in ours(caplog)
    assert "s3cr3t" not in ours(caplog)


def _pinging_server(every_s: float, first: str | None = None):
    def behave(ws: ServerConnection) -> None:
        ws.recv(timeout=5)  # the subscribe frame
        if first:
            ws.send(first)
        try:
            while True:
                time.sleep(every_s)
                ws.send('{"type":"ping"}')
        except Exception:
            return

    server = serve(behave, "127.0.0.1", 0, compression=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"ws://127.0.0.1:{server.socket.getsockname()[1]}"


def test_a_handler_failure_is_logged_without_the_token(caplog):
    server, url = _pinging_server(0.05)
    adapter = Finnhub(VenueConfig("finnhub", url, "http://127.0.0.1:1", credential=TOKEN))

    def on_frame(raw: bytes, recv_us: int) -> None:
        raise RuntimeError(f"handler saw {adapter.connection_url([], [])}")

    conn = Connection(adapter, ["AAPL-USD"], ["trades"], on_frame,
                      policy=ConnectionPolicy(poll_s=0.05, backoff_s=5))  # fmt: skip
    try:
        with caplog.at_level(logging.DEBUG):
            _run_briefly(conn, 0.6)
    finally:
        server.shutdown()
    assert conn.reconnects["handler_error"] >= 1 and "frame handler failed" in ours(caplog)
    assert "handler saw ws://127.0.0.1" in ours(caplog) and "s3cr3t" not in ours(caplog)


def test_pings_alone_keep_a_quiet_market_connected():
    """Outside market hours a stock sends no trades; Finnhub's pings are text frames the
    connection counts as traffic, so the watchdog does not reconnect."""
    server, url = _pinging_server(0.2)
    adapter = Finnhub(VenueConfig("finnhub", url, "http://127.0.0.1:1", credential=TOKEN))
    seen: list[str] = []

    def on_frame(raw: bytes, recv_us: int) -> None:
        seen.append(adapter.parse(raw, recv_us).control or "")

    conn = Connection(adapter, ["AAPL-USD"], ["trades"], on_frame,
                      policy=ConnectionPolicy(stall_timeout_s=1.0, poll_s=0.05))  # fmt: skip
    try:
        _run_briefly(conn, 2.5)
    finally:
        server.shutdown()
    assert conn.connects == 1 and not conn.reconnects, conn.reconnects
    assert len(seen) >= 5 and set(seen) == {"heartbeat"}


# -- verify: no holes for a venue without sequential ids -------------------------------------


def test_verify_counts_no_holes_and_allows_venue_repeats_without_sequential_ids():
    assert not sequential("finnhub") and not sequential("finnhub-sim")
    assert sequential("binance-sim") and sequential("soak-poison")
    spread = SymbolCheck("AAPL-USD", stored=3, first_id=5, last_id=2**62, in_kafka=3,
                         duplicates_in_kafka=2, sequential=False)  # fmt: skip
    assert spread.holes == 0 and Verdict([spread]).ok
    lost = SymbolCheck("AAPL-USD", 3, 5, 2**62, 4, 0, missing_from_store=1, sequential=False)
    assert Verdict([lost]).problems == ["AAPL-USD: 1 ids in Kafka but not stored"]
    assert SymbolCheck("BTC-USDT", 3, 1, 5).holes == 2  # sequential venues unchanged


# -- REST candles against a local HTTP server -------------------------------------------------

T0 = 1_700_000_040  # a minute boundary (seconds)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.throttle = 0
        self.body: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args):
        pass

    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.server.requests.append((u.path, q, {k.lower(): v for k, v in self.headers.items()}))
        if self.headers.get(TOKEN_HEADER) != TOKEN:
            return self._send(401, {"error": "Invalid API key."})
        if self.server.throttle:
            self.server.throttle -= 1
            return self._send(429, {"error": "API limit reached."}, {"Retry-After": "2"})
        if self.server.body is not None:
            return self._send(200, self.server.body)
        lo, hi = int(q["from"]), int(q["to"])
        # one candle a minute from T0 - 120 s to T0 + 600 s, whatever was asked (the
        # client keeps only what opens in its range)
        ts = list(range(T0 - 120, T0 + 600, 60))
        body = {
            "c": [189.5 + i / 100 for i in range(len(ts))],
            "h": [190.125] * len(ts), "l": [189.0] * len(ts),
            "o": [189.25] * len(ts), "t": ts, "v": [1000 + i for i in range(len(ts))],
            "s": "ok" if lo <= hi else "no_data",
        }  # fmt: skip
        self._send(200, body)

    def _send(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


def rest(url: str, token: str = TOKEN, **http) -> FinnhubRest:
    cfg = VenueConfig("finnhub", "ws://127.0.0.1:1", url, credential=token)
    return FinnhubRest(cfg, Http(url, **({"sleep": lambda s: None} | http)))


def test_klines_are_exact_venue_candles_in_the_range_with_the_token_in_a_header(server):
    start_us, end_us = T0 * 1_000_000, (T0 + 300) * 1_000_000
    candles = list(rest(server.url).klines("AAPL-USD", "1m", start_us, end_us))
    assert [c.open_us for c in candles] == [(T0 + 60 * i) * 1_000_000 for i in range(5)]
    c = candles[0]
    assert (c.venue, c.symbol, c.interval, c.source) == ("finnhub", "AAPL-USD", "1m", "venue")
    assert (str(c.open), str(c.high), str(c.low), str(c.close), str(c.volume)) == (
        "189.25", "190.125", "189.0", "189.52", "1002"
    )  # fmt: skip
    assert (c.trade_count, c.vwap) == (0, Decimal(0))  # not reported by Finnhub
    assert all(validate(x) == x for x in candles)
    path, q, headers = server.requests[0]
    assert path == "/api/v1/stock/candle"
    assert q == {"symbol": "AAPL", "resolution": "1", "from": str(T0), "to": str(T0 + 299)}
    assert "token" not in q and headers[TOKEN_HEADER.lower()] == TOKEN


@pytest.mark.parametrize(
    ("symbol", "path", "name"),
    [("BTC-USDTBINANCE", "/api/v1/crypto/candle", "BINANCE:BTCUSDT"),
     ("EUR-USDOANDA", "/api/v1/forex/candle", "OANDA:EUR_USD")],
)  # fmt: skip
def test_crypto_and_forex_candles_come_from_their_own_endpoints(server, symbol, path, name):
    list(rest(server.url).klines(symbol, "1h", T0 * 1_000_000, (T0 + 60) * 1_000_000))
    assert server.requests[0][:2] == (path, {"symbol": name, "resolution": "60", "from": str(T0),
                                             "to": str(T0 + 59)})  # fmt: skip


def test_no_data_is_no_candles_and_a_bad_body_is_an_error(server):
    server.body = {"s": "no_data"}
    assert list(rest(server.url).klines("AAPL-USD", "1d", 0, 86_400_000_000)) == []
    server.body = {"c": [1], "h": [1], "l": [1], "o": [1], "t": [], "v": [1], "s": "ok"}
    with pytest.raises(FeedError, match="bad row"):
        list(rest(server.url).klines("AAPL-USD", "1m", 0, 60_000_000))
    server.body = {"error": "You don't have access to this resource."}
    with pytest.raises(RestError, match="access"):
        list(rest(server.url).klines("AAPL-USD", "1m", 0, 60_000_000))
    with pytest.raises(ValueError, match="not '4h'"):
        list(rest(server.url).klines("AAPL-USD", "4h", 0, 60_000_000))


def test_429_is_honoured_and_requests_are_paced_a_second_apart(server):
    server.throttle = 1
    slept: list[float] = []
    now = [1000.0]

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    client = rest(server.url, sleep=sleep, clock=lambda: now[0], min_interval_s=1.0)
    list(client.klines("AAPL-USD", "1m", T0 * 1_000_000, (T0 + 60) * 1_000_000))
    list(client.klines("AAPL-USD", "1m", T0 * 1_000_000, (T0 + 60) * 1_000_000))
    assert len(server.requests) == 3  # 429, then the answer, then the second call
    assert 2.0 in slept  # Retry-After
    assert sum(slept) >= 3.0  # and each call at least a second after the previous one


def test_a_refused_token_is_an_error_that_does_not_quote_it(server):
    with pytest.raises(RestError) as refused:
        list(rest(server.url, token="wr0ng-t0ken").klines("AAPL-USD", "1m", 0, 60_000_000))
    assert refused.value.status == 401 and "wr0ng" not in str(refused.value)
    with pytest.raises(RestError, match="no API token"):
        list(rest(server.url, token="").klines("AAPL-USD", "1m", 0, 60_000_000))
