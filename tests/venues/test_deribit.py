"""Deribit adapter: documented JSON-RPC frames -> exact events, malformed frames ->
FeedError with the reason (and nothing else, whatever the input), instrument names <->
canonical symbols, subscribe and heartbeat frames, the heartbeat answer sent on the live
socket, and REST history by sequence and by time against a local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.server import ServerConnection, serve

from tasks import venues
from tasks.core.codec import validate
from tasks.core.events import Quote, Trade
from tasks.venues.base import FeedError, VenueConfig
from tasks.venues.connection import Connection, ConnectionPolicy
from tasks.venues.deribit import TEST_REPLY, Deribit, DeribitRest, instrument
from tasks.venues.http import Http, RestError

FIXTURES = Path(__file__).parent / "fixtures" / "deribit"
RECV = 1_703_000_000_500_000


def frame(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def deribit() -> Deribit:
    return Deribit()


EXPECTED = {
    "trades_batch.json": [
        Trade("deribit", "BTC-USDPERP", "BTC-PERPETUAL", 30289432, Decimal("8950.5"),
              Decimal("10"), "sell", 1_590_484_156_350_000, RECV),
        # More digits than a float holds, trailing zero kept: exactly as written.
        Trade("deribit", "BTC-USDPERP", "BTC-PERPETUAL", 30289433, Decimal("8950.50"),
              Decimal("0.10000000000000000555"), "buy", 1_590_484_156_350_000, RECV),
    ],
    "trades_option.json": [
        Trade("deribit", "XRP-USDC30JUN230D625C", "XRP_USDC-30JUN23-0d625-C", 17,
              Decimal("0.0031"), Decimal("1000"), "buy", 1_687_420_800_123_000, RECV),
    ],
    "trades_empty.json": [],
    "quote.json": [
        Quote("deribit", "BTC-USD27DEC24", "BTC-27DEC24", None, Decimal("43210.5"),
              Decimal("12340"), Decimal("43211.0"), Decimal("0"), 1_703_000_000_001_000, RECV),
    ],
}  # fmt: skip

CONTROL = {
    "subscribe_result.json": ("ack", "id=2 ['trades.BTC-PERPETUAL.100ms']", None),
    "set_heartbeat_result.json": ("ack", "id=1 ok", None),
    "heartbeat_test_request.json": ("heartbeat", "test_request", TEST_REPLY),
    "heartbeat.json": ("heartbeat", "heartbeat", None),
    "error_response.json": ("error", "id=2 -32602: Invalid params {'reason'", None),
}

MALFORMED = {
    "bad_trade_missing_seq.json": "deribit trade: missing field 'trade_seq'",
    "bad_trade_direction.json": "deribit: direction: unknown direction 'short'",
    "bad_trade_string_price.json": "deribit trade 'BTC-PERPETUAL': price: not a number",
    "bad_trade_bool_amount.json": "deribit: amount: expected a decimal, got True",
    "bad_trade_huge_price.json": "deribit trade 'BTC-PERPETUAL': price:",
    "bad_trade_huge_seq.json": "deribit trade 'BTC-PERPETUAL': trade_id:",
    "bad_trade_nan_amount.json": "deribit trade 'BTC-PERPETUAL': qty: not finite: 'NaN'",
    "bad_trade_float_timestamp.json": "deribit: timestamp: expected integer epoch milliseconds",
    "bad_trade_unicode_instrument.json": "deribit: instrument_name: not a Deribit instrument",
    "bad_trades_data_object.json": "deribit: data: expected an array",
    "bad_quote_empty_data.json": "deribit quote: missing field 'instrument_name'",
    "bad_quote_missing_ask.json": "deribit quote: missing field 'best_ask_price'",
    "bad_unknown_channel.json": "deribit: unknown channel 'book.BTC-PERPETUAL.100ms'",
    "bad_params_not_object.json": "deribit: params: expected an object",
    "bad_truncated.json": "deribit: not JSON:",
    "bad_unknown_frame.json": "deribit: unknown frame, method 'public/hello'",
}


def test_every_fixture_has_an_expectation():
    named = set(EXPECTED) | set(CONTROL) | set(MALFORMED)
    assert {p.name for p in FIXTURES.glob("*.json")} == named


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_data_frames_become_exact_valid_events(deribit, name):
    parsed = deribit.parse(frame(name), RECV)
    assert (parsed.control, parsed.reply) == (None, None)
    assert parsed.events == EXPECTED[name]
    for event, expected in zip(parsed.events, EXPECTED[name], strict=True):
        assert validate(event) == event
        for field in ("price", "qty", "bid_price", "bid_qty", "ask_price", "ask_qty"):
            if hasattr(event, field):
                assert str(getattr(event, field)) == str(getattr(expected, field))


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_control_frames(deribit, name):
    parsed = deribit.parse(frame(name), RECV)
    control, detail, reply = CONTROL[name]
    assert (parsed.control, parsed.events, parsed.reply) == (control, [], reply)
    assert parsed.detail.startswith(detail), parsed.detail


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_raise_feed_error_with_reason(deribit, name):
    with pytest.raises(FeedError) as exc:
        deribit.parse(frame(name), RECV)
    assert exc.value.reason.startswith(MALFORMED[name]), exc.value.reason


def test_the_heartbeat_answer_is_a_public_test_request():
    assert json.loads(TEST_REPLY) == {
        "jsonrpc": "2.0", "id": 0, "method": "public/test", "params": {}
    }  # fmt: skip


# -- property: parse raises FeedError or nothing, on anything ------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_trade_fields = st.fixed_dictionaries(
    {},
    optional={
        "trade_seq": _json | st.integers(min_value=0, max_value=2**70),
        "timestamp": _json | st.integers(min_value=0, max_value=2**50),
        "price": _json, "amount": _json, "direction": _json | st.sampled_from(["buy", "sell"]),
        "instrument_name": _json | st.sampled_from(["BTC-PERPETUAL", "BTC-27DEC24-1-C", "Ω"]),
    },
)  # fmt: skip
_frames = st.one_of(
    _json.map(json.dumps),
    st.binary(max_size=64),
    st.builds(
        lambda channel, data: json.dumps(
            {"method": "subscription", "params": {"channel": channel, "data": data}}
        ),
        st.sampled_from(["trades.BTC-PERPETUAL.100ms", "quote.BTC-PERPETUAL", "x", ""]) | _json,
        st.lists(_trade_fields, max_size=3) | _trade_fields | _json,
    ),
    st.builds(
        lambda m, p, rid: json.dumps({"jsonrpc": "2.0", "method": m, "params": p, "id": rid}),
        st.sampled_from(["heartbeat", "subscription"]) | _json, _json, _json,
    ),
    st.builds(lambda r, rid: json.dumps({"id": rid, "result": r}), _json, _json),
    st.builds(lambda e, rid: json.dumps({"id": rid, "error": e}), _json, _json),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_frames)
def test_parse_raises_only_feed_error(raw):
    d = Deribit()
    d.subscribe_frames(["BTC-USDPERP"], ["trades", "quotes"])
    try:
        parsed = d.parse(raw, RECV)
    except FeedError:
        return
    for event in parsed.events:
        assert validate(event) == event


# -- symbols and subscribing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical", "kind"),
    [
        ("BTC-PERPETUAL", "BTC-USDPERP", "perpetual"),
        ("ETH_USDC-PERPETUAL", "ETH-USDCPERP", "perpetual"),
        ("BTC-27DEC24", "BTC-USD27DEC24", "future"),
        ("ETH-5JAN25", "ETH-USD5JAN25", "future"),
        ("BTC-27DEC24-100000-C", "BTC-USD27DEC24100000C", "option"),
        ("XRP_USDC-30JUN23-0d625-P", "XRP-USDC30JUN230D625P", "option"),
        ("BTC_USDC", "BTC-USDC", "spot"),
    ],
)
def test_instruments_map_both_ways(deribit, name, canonical, kind):
    assert deribit.to_canonical(name) == canonical
    assert deribit.to_venue_symbol(canonical) == name
    assert deribit.to_venue_symbol(canonical.lower()) == name
    assert instrument(name).kind == kind == instrument(canonical, canonical=True).kind


@pytest.mark.parametrize("name", ["BTC", "BTC-FS-27DEC24_PERP", "btc-perpetual", "BTC-27DEC24-1-X"])
def test_other_names_are_refused(deribit, name):
    with pytest.raises(ValueError, match="not a Deribit instrument"):
        deribit.to_canonical(name)


def test_subscribe_frames_set_the_heartbeat_then_subscribe_per_channel():
    d = venues.venue("deribit")
    assert d.connection_url(["BTC-USDPERP"], ["trades"]) == "wss://www.deribit.com/ws/api/v2"
    frames = [json.loads(f) for f in d.subscribe_frames(["BTC-USDPERP", "ETH-USD27DEC24"],
                                                        ["trades", "quotes"])]  # fmt: skip
    assert frames == [
        {"jsonrpc": "2.0", "id": 1, "method": "public/set_heartbeat", "params": {"interval": 10}},
        {"jsonrpc": "2.0", "id": 2, "method": "public/subscribe",
         "params": {"channels": ["trades.BTC-PERPETUAL.100ms", "trades.ETH-27DEC24.100ms"]}},
        {"jsonrpc": "2.0", "id": 3, "method": "public/subscribe",
         "params": {"channels": ["quote.BTC-PERPETUAL", "quote.ETH-27DEC24"]}},
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown channel"):
        d.subscribe_frames(["BTC-USDPERP"], ["book"])


def test_an_ack_leaving_out_a_channel_is_an_error(deribit):
    """Deribit acks an unknown channel by leaving it out of the result, without error."""
    deribit.subscribe_frames(["BTC-USDPERP", "ETH-USDPERP"], ["trades"])
    ok = deribit.parse('{"jsonrpc":"2.0","id":2,"result":["trades.BTC-PERPETUAL.100ms",'
                       '"trades.ETH-PERPETUAL.100ms"]}', RECV)  # fmt: skip
    assert ok.control == "ack"
    short = deribit.parse('{"jsonrpc":"2.0","id":2,"result":["trades.BTC-PERPETUAL.100ms"]}', RECV)
    assert short.control == "error"
    assert short.detail == "id=2 not subscribed: ['trades.ETH-PERPETUAL.100ms']"


def test_registry_entry_repairs_gaps_and_points_at_the_simulator():
    spec = venues.spec("deribit")
    assert spec.sequential_ids and not spec.klines
    cfg = venues.venue_config("deribit", "http://127.0.0.1:18765")
    assert (cfg.name, cfg.ws_url, cfg.rest_url) == (
        "deribit-sim", "ws://127.0.0.1:18765/deribit", "http://127.0.0.1:18765"
    )  # fmt: skip
    assert isinstance(venues.gap_history("deribit"), DeribitRest)


# -- the heartbeat answer goes out on the live socket ---------------------------------------


def test_test_request_is_answered_on_the_same_connection():
    got: list[str] = []
    answered = threading.Event()

    def behave(ws: ServerConnection) -> None:
        for _ in range(3):  # set_heartbeat, subscribe trades, subscribe quotes
            ws.recv(timeout=5)
        ws.send('{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}')
        got.append(ws.recv(timeout=5))
        answered.set()
        ws.recv(timeout=10)  # until the client closes

    with serve(behave, "127.0.0.1", 0, compression=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        cfg = VenueConfig("deribit", url, "http://127.0.0.1:1", subscribe_rate_per_s=100)
        adapter = Deribit(cfg)

        def on_frame(raw: bytes, recv_us: int) -> None:
            reply = adapter.parse(raw, recv_us).reply
            if reply is not None:
                conn.send(reply)

        conn = Connection(adapter, ["BTC-USDPERP"], ["trades", "quotes"], on_frame,
                          policy=ConnectionPolicy(poll_s=0.05))  # fmt: skip
        reader = threading.Thread(target=conn.run, daemon=True)
        reader.start()
        assert answered.wait(10)
        conn.stop()
        reader.join(10)
        server.shutdown()
    assert got == [TEST_REPLY]
    with pytest.raises(RuntimeError, match="no live connection"):
        conn.send(TEST_REPLY)


# -- REST history against a local HTTP server ------------------------------------------------

T0_MS = 1_700_000_000_000
FIRST_SEQ, LAST_SEQ = 500, 2999  # one trade every 100 ms, three per millisecond at 700..702


def rest_trade(seq: int) -> dict:
    ms = T0_MS + (seq - FIRST_SEQ) * 100 if not 700 <= seq <= 702 else T0_MS + 20_000
    return {
        "trade_seq": seq, "trade_id": f"ETH-{seq}", "timestamp": ms, "tick_direction": 0,
        # JSON numbers, as Deribit sends them; a float's shortest repr is the decimal written
        "price": float(f"2300.{seq % 100:02d}"), "mark_price": 2300.1, "index_price": 2300.2,
        "instrument_name": "ETH-PERPETUAL", "direction": "sell" if seq % 2 == 0 else "buy",
        "amount": seq,
    }  # fmt: skip


TRADES = [rest_trade(s) for s in range(FIRST_SEQ, LAST_SEQ + 1)]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.skip: int | None = None  # a sequence the server leaves out

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
        self.server.requests.append((u.path, q))
        rows = [t for t in TRADES if t["trade_seq"] != self.server.skip]
        if u.path == "/api/v2/public/get_last_trades_by_instrument":
            lo, hi = int(q.get("start_seq", 0)), int(q.get("end_seq", 10**9))
            rows = [t for t in rows if lo <= t["trade_seq"] <= hi]
        elif u.path == "/api/v2/public/get_last_trades_by_instrument_and_time":
            lo, hi = int(q["start_timestamp"]), int(q["end_timestamp"])
            rows = [t for t in rows if lo <= t["timestamp"] <= hi]
        else:
            self.send_error(404)
            return
        count = int(q.get("count", 10))
        rows = rows[-count:] if q.get("sorting") == "desc" else rows[:count]
        if q.get("sorting") == "desc":
            rows = rows[::-1]
        body = {"jsonrpc": "2.0", "result": {"trades": rows, "has_more": len(rows) == count}}
        data = json.dumps(body).encode()
        self.send_response(200)
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


def rest(url: str) -> DeribitRest:
    return DeribitRest(VenueConfig("deribit", "ws://127.0.0.1:1", url), Http(url))


def test_trades_by_id_pages_by_sequence_with_exact_numbers(server):
    trades = list(rest(server.url).trades_by_id("ETH-USDPERP", 600, 1800))
    assert [t.trade_id for t in trades] == list(range(600, 1801))
    t = trades[1]
    assert (t.venue, t.symbol, t.venue_symbol, t.side) == (
        "deribit", "ETH-USDPERP", "ETH-PERPETUAL", "buy"
    )  # fmt: skip
    assert (str(t.price), t.qty, t.event_us) == ("2300.01", Decimal(601), (T0_MS + 10_100) * 1000)
    assert all(validate(x) == x for x in trades)
    pages = [q for p, q in server.requests]
    assert [(q["start_seq"], q["end_seq"], q["count"], q["sorting"]) for q in pages] == [
        ("600", "1599", "1000", "asc"), ("1600", "1800", "201", "asc"),
    ]  # fmt: skip


def test_trades_by_id_refuses_to_hide_a_hole(server):
    server.skip = 650
    with pytest.raises(RestError, match="seq jumps 650 -> 651"):
        list(rest(server.url).trades_by_id("ETH-USDPERP", 600, 700))


def test_historical_trades_without_an_id_are_the_newest_oldest_first(server):
    trades = rest(server.url).historical_trades("ETH-USDPERP", None, 3)
    assert [t.trade_id for t in trades] == [LAST_SEQ - 2, LAST_SEQ - 1, LAST_SEQ]


def test_trades_by_time_is_half_open_and_complete(server):
    start_us, end_us = (T0_MS + 20_000) * 1000, (T0_MS + 150_000) * 1000
    trades = list(rest(server.url).trades_by_time("ETH-USDPERP", start_us, end_us))
    expected = [t["trade_seq"] for t in TRADES if start_us <= t["timestamp"] * 1000 < end_us]
    assert [t.trade_id for t in trades] == expected and expected[:3] == [700, 701, 702]
    first = server.requests[0]
    assert first[0] == "/api/v2/public/get_last_trades_by_instrument_and_time"
    assert (first[1]["count"], first[1]["sorting"]) == ("1", "asc")


def test_trades_by_time_of_an_empty_range_asks_once(server):
    assert list(rest(server.url).trades_by_time("ETH-USDPERP", 10**15, 10**15 + 1000)) == []
    assert len(server.requests) == 1


def test_rest_is_paced_conservatively():
    client = venues.rest_client("deribit")
    assert client.http.min_interval_s == 0.2  # type: ignore[attr-defined]
