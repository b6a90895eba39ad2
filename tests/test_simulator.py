"""The exchange simulator, driven through the project's real venue adapters.

What must hold for the pipeline's own tests to mean anything: per-symbol trade ids in
order, every injected gap/duplicate/malformed frame seen by a client exactly as the
simulator's ledger reports it, gaps repairable from REST with the very same trades,
Binance-shaped REST errors and throttling, and slow or silent clients cut off rather
than buffered without bound.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from itertools import pairwise

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from simulator import Simulator
from simulator.market import Market, MarketParams, instrument
from simulator.process import SimulatorProcess
from tasks.core.events import Quote, Trade
from tasks.venues import venue
from tasks.venues.base import FeedError, VenueConfig
from tasks.venues.binance import BinanceRest
from tasks.venues.http import Http

SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(**overrides) -> Simulator:
        opts = {"port": 0, "symbols": SYMBOLS, "rate": 3000, "bursts": False} | overrides
        sim = Simulator(**opts).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


def config(sim: Simulator, name: str) -> VenueConfig:
    return VenueConfig(name, sim.ws_url(name), sim.rest_url(name))


def now_us() -> int:
    return time.time_ns() // 1000


class Tape:
    """What one client saw: trades per symbol in arrival order, the gaps and repeats it
    can name from the ids alone, frames its adapter rejected, control frames."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.trades: dict[str, list[Trade]] = {}
        self.quotes: list[Quote] = []
        self.last: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self.gaps: dict[str, list[int]] = {}
        self.dups: dict[str, list[int]] = {}
        self.rejected: list[str] = []
        self.controls: list[str] = []

    def feed(self, raw: str) -> None:
        try:
            parsed = self.adapter.parse(raw, now_us())
        except FeedError:
            self.rejected.append(raw)
            return
        if parsed.control:
            self.controls.append(parsed.control)
        for ev in parsed.events:
            if isinstance(ev, Quote):
                self.quotes.append(ev)
                continue
            sym, tid = ev.symbol, ev.trade_id
            last = self.last.get(sym)
            if last is None:
                self.first[sym] = tid
            elif tid <= last:
                self.dups.setdefault(sym, []).append(tid)
                continue
            elif tid > last + 1:
                self.gaps.setdefault(sym, []).extend(range(last + 1, tid))
            self.last[sym] = tid
            self.trades.setdefault(sym, []).append(ev)

    def count(self, sym: str) -> int:
        return len(self.trades.get(sym, []))


def read(ws: ClientConnection, tape: Tape, done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, "timed out waiting for the stream"
        tape.feed(ws.recv(timeout=left))


def enough(tape: Tape, n: int) -> Callable[[], bool]:
    return lambda: all(tape.count(s) >= n for s in SYMBOLS)


def stream(url: str) -> ClientConnection:
    """A client that keeps reading in its background thread whatever the test does, so
    closing never waits behind frames the test did not consume."""
    return connect(url, max_queue=None, close_timeout=2)


def http_get(url: str) -> tuple[int, dict[str, str], object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def key(t: Trade) -> tuple:
    return (t.symbol, t.trade_id, t.price, t.qty, t.side, t.event_us)


# ---- the market ---------------------------------------------------------------------


def test_market_content_depends_on_seed_not_batching_and_trades_sit_inside_the_book():
    params = MarketParams(rate=1000, burst_rate=0, start_id=500)
    one = Market(instrument("BTC-USDT"), params, 1_700_000_000_000)
    book = one.quote(1_700_000_000_000)
    trades, quotes = one.generate(20_000, 1_700_000_060_000)
    other = Market(instrument("BTC-USDT"), params, 1_700_000_000_000)
    batched = [t for k in range(200) for t in other.generate(100, 1_700_000_000_000 + k)[0]]
    assert [t[:3] + t[4:] for t in trades] == [t[:3] + t[4:] for t in batched]
    assert [t.id for t in trades] == list(range(500, 20_500))
    assert all(a.ts_ms <= b.ts_ms for a, b in pairwise(trades))
    assert len(quotes) > 1000 and all(q.bid < q.ask for q in quotes)
    assert [q.update_id for q in quotes] == sorted({q.update_id for q in quotes})
    # every trade executes at the touch of the book last published before it
    pending = iter(quotes)
    nxt = next(pending)
    for t in trades:
        while nxt is not None and nxt.after_id < t.id:
            book, nxt = nxt, next(pending, None)
        assert book.bid < book.ask
        assert t.price == (book.bid if t.buyer_maker else book.ask)
    # history serves the same rows the generator returned
    assert one.from_id(10_000, 3) == trades[9_500:9_503]
    assert one.recent(2) == trades[-2:]


# ---- Binance stream -----------------------------------------------------------------


def test_binance_adapter_receives_every_symbol_in_id_order_and_rest_has_the_same_trades(
    make_sim,
):
    sim = make_sim()
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    with stream(binance.connection_url(list(SYMBOLS), ["trades", "quotes"])) as ws:
        read(ws, tape, enough(tape, 300))
    for sym in SYMBOLS:
        ids = [t.trade_id for t in tape.trades[sym]]
        assert ids == list(range(ids[0], ids[0] + len(ids))), sym
    assert not tape.gaps and not tape.dups and not tape.rejected
    assert {q.symbol for q in tape.quotes} == set(SYMBOLS)
    assert all(q.bid_price < q.ask_price for q in tape.quotes)

    rest = BinanceRest(config(sim, "binance"))
    for sym in SYMBOLS:
        seen = tape.trades[sym][:250]
        again = rest.historical_trades(sym, from_id=seen[0].trade_id, limit=len(seen))
        assert [key(t) for t in again] == [key(t) for t in seen]

    report = sim.report()["venues"]["binance"]["symbols"]["BTC-USDT"]
    first, last = tape.first["BTC-USDT"], tape.last["BTC-USDT"]
    run = next(r for r in report["sent_runs"] if r[0] <= first <= r[1])
    assert run[1] >= last and report["skipped_count"] == report["duplicated_count"] == 0


def test_live_subscribe_on_raw_ws_path(make_sim):
    sim = make_sim()
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    with stream(sim.ws_url("binance") + "/ws") as ws:
        (frame,) = binance.subscription_frames(["BTC-USDT", "ETH-USDT"], ["trades"], first_id=7)
        ws.send(frame)
        read(ws, tape, lambda: tape.count("BTC-USDT") >= 50 and tape.count("ETH-USDT") >= 50)
        assert tape.controls[0] == "ack"
        ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 8}))
        ws.send(
            binance.subscription_frames(["ETH-USDT"], ["trades"], unsubscribe=True, first_id=9)[0]
        )
        replies = []
        while len(replies) < 2:
            raw = ws.recv(timeout=30)
            if '"id"' in raw:
                replies.append(json.loads(raw))
        assert replies[0] == {"result": ["btcusdt@trade", "ethusdt@trade"], "id": 8}
        assert replies[1] == {"result": None, "id": 9}
        eth_before = tape.count("ETH-USDT")
        btc_before = tape.count("BTC-USDT")
        read(ws, tape, lambda: tape.count("BTC-USDT") >= btc_before + 100)
        assert tape.count("ETH-USDT") == eth_before
        ws.send("not json")
        while '"error"' not in (raw := ws.recv(timeout=30)):
            pass
        assert json.loads(raw)["error"]["code"] == 3  # an error frame, and the stream goes on
        assert '"e":"trade"' in ws.recv(timeout=30)


def test_client_names_every_injected_gap_duplicate_and_malformed_frame_as_the_ledger_does(
    make_sim,
):
    faults = {"gap_every": 40, "gap_size": 2, "dup_every": 55, "malformed_every": 70}
    sim = make_sim(faults={"binance": faults})
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    with stream(binance.connection_url(list(SYMBOLS), ["trades"])) as ws:
        read(ws, tape, enough(tape, 400))
    ledger = sim.report()["venues"]["binance"]["symbols"]
    expected_bad = []
    for sym in SYMBOLS:
        first, last = tape.first[sym], tape.last[sym]
        led = ledger[sym]
        assert tape.gaps[sym] == [i for i in led["skipped_ids"] if first < i < last]
        assert [i for i in tape.dups[sym] if i < last] == [
            i for i in led["duplicated_ids"] if first <= i < last
        ]
        expected_bad += [
            text for m in led["malformed"] if first <= m["before_id"] <= last for text in m["texts"]
        ]
        assert len(tape.gaps[sym]) >= 10 and len(tape.dups[sym]) >= 5
        assert {m["kind"] for m in led["malformed"]} == {
            "invalid_json",
            "nan_price",
            "missing_field",
        }
    assert Counter(tape.rejected) == Counter(expected_bad) and len(expected_bad) >= 15

    # the skipped ids are exactly what REST returns for the holes
    rest = BinanceRest(config(sim, "binance"))
    for sym in SYMBOLS:
        holes = tape.gaps[sym]
        got = [t.trade_id for t in rest.trades_by_id(sym, holes[0], holes[-1])]
        assert set(holes) <= set(got) and got == list(range(holes[0], holes[-1] + 1))


def test_drops_are_repaired_from_rest_so_nothing_is_lost_or_doubled(make_sim):
    sim = make_sim(faults={"binance": {"drop_every": 300}})
    binance = venue("binance", config(sim, "binance"))
    rest = BinanceRest(config(sim, "binance"))
    tape = Tape(binance)
    drops = 0
    while drops < 3:
        with stream(binance.connection_url(list(SYMBOLS), ["trades"])) as ws:
            try:
                read(ws, tape, lambda: False)
            except ConnectionClosed:
                drops += 1
        time.sleep(0.05)  # a reconnect backoff: trades go by meanwhile
    assert all(tape.gaps.get(s) for s in SYMBOLS), "reconnects should leave holes"
    assert sim.report()["venues"]["binance"]["disconnects"] == drops
    for sym in SYMBOLS:
        have = {t.trade_id: t for t in tape.trades[sym]}
        holes = tape.gaps[sym]
        for t in rest.trades_by_id(sym, holes[0], holes[-1]):
            have.setdefault(t.trade_id, t)
        first, last = tape.first[sym], tape.last[sym]
        assert sorted(have) == list(range(first, last + 1))


def test_server_shutdown_notice_then_close(make_sim):
    sim = make_sim(shutdown_grace_s=0.3)
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    with stream(binance.connection_url(["BTC-USDT"], ["trades"])) as ws:
        read(ws, tape, lambda: tape.count("BTC-USDT") >= 20)
        sim.inject("shutdown")
        read(ws, tape, lambda: "server_shutdown" in tape.controls)
        with pytest.raises(ConnectionClosed) as closed:  # 1001: a close frame, not a timeout
            read(ws, tape, lambda: False, timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert sim.report()["venues"]["binance"]["shutdowns"] == 1


def test_stall_goes_silent_without_closing_then_resumes_without_loss(make_sim):
    sim = make_sim(rate=600)
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    with stream(binance.connection_url(list(SYMBOLS), ["trades"])) as ws:
        read(ws, tape, enough(tape, 10))
        sim.inject("stall", seconds=1.0)
        longest, last_at = 0.0, time.monotonic()
        target = {s: tape.count(s) + 400 for s in SYMBOLS}

        def done() -> bool:
            nonlocal longest, last_at
            now = time.monotonic()
            longest, last_at = max(longest, now - last_at), now
            return all(tape.count(s) >= target[s] for s in SYMBOLS)

        read(ws, tape, done)
    assert longest >= 0.8  # the stream went silent for the stall, then resumed (done())
    assert not tape.gaps and not tape.dups
    assert sim.report()["venues"]["binance"]["stalls"] == 1


# ---- Binance REST -------------------------------------------------------------------


def test_rest_throttle_answers_429_with_retry_after_and_the_client_honours_it(make_sim):
    sim = make_sim(throttle=2, retry_after_s=3)
    for _ in range(2):
        status, headers, body = http_get(f"{sim.http_url}/api/v3/ping")
        assert (status, headers["Retry-After"], body["code"]) == (429, "3", -1003)
    status, headers, body = http_get(f"{sim.http_url}/api/v3/ping")
    assert status == 200 and body == {} and headers["X-MBX-USED-WEIGHT-1m"] == "1"

    sim.inject("throttle", n=1, retry_after=2)
    wait_for(lambda: sim.report()["markets"]["BTC-USDT"]["generated"] >= 5, 5)
    waits: list[float] = []
    rest = BinanceRest(config(sim, "binance"), Http(sim.http_url, sleep=waits.append))
    assert len(rest.recent_trades("BTC-USDT", limit=5)) == 5
    assert waits == [2.0]
    assert sim.report()["rest"]["throttled"] == 3


def test_rest_errors_are_binance_shaped(make_sim):
    sim = make_sim()
    api = f"{sim.http_url}/api/v3"
    cases = {
        "/trades?symbol=NOPE": (400, -1121),
        "/historicalTrades": (400, -1102),
        "/historicalTrades?symbol=BTCUSDT&fromId=x1": (400, -1100),
        "/klines?symbol=BTCUSDT&interval=7m": (400, -1120),
        "/aggTrades?symbol=BTCUSDT&startTime=0&endTime=3600001": (400, -1127),
    }
    for path, (status, code) in cases.items():
        got_status, headers, body = http_get(api + path)
        assert (got_status, body["code"]) == (status, code), path
        assert "msg" in body and "X-MBX-USED-WEIGHT-1m" in headers
    assert http_get(api + "/time")[2]["serverTime"] > 1_700_000_000_000
    assert http_get(f"{sim.http_url}/nothing")[0] == 404


def test_rest_klines_and_agg_trades_are_computed_from_the_same_history(make_sim):
    sim = make_sim(rate=900)
    time.sleep(2.2)
    first = sim.report()["markets"]["BTC-USDT"]["first_id"]
    rows = http_get(
        f"{sim.http_url}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={first}&limit=1000"
    )[2]
    assert [r["id"] for r in rows] == list(range(first, first + len(rows))) and len(rows) > 400
    assert rows[0]["quoteQty"] == str(
        (Decimal(rows[0]["price"]) * Decimal(rows[0]["qty"])).quantize(Decimal("1e-8"))
    )
    last_bucket = rows[-1]["time"] // 1000 * 1000
    start, end = rows[0]["time"], last_bucket - 1
    klines = http_get(
        f"{sim.http_url}/api/v3/klines?symbol=BTCUSDT&interval=1s&startTime={start}&endTime={end}"
    )[2]
    assert len(klines) >= 1 and all(len(k) == 12 and k[-1] == "0" for k in klines)
    for k in klines:
        inside = [r for r in rows if k[0] <= r["time"] <= k[6]]
        prices = [Decimal(r["price"]) for r in inside]
        assert k[6] == k[0] + 999 and k[8] == len(inside)
        assert [Decimal(x) for x in k[1:5]] == [prices[0], max(prices), min(prices), prices[-1]]
        assert Decimal(k[5]) == sum(Decimal(r["qty"]) for r in inside)
        taker_buys = [r for r in inside if not r["isBuyerMaker"]]
        assert Decimal(k[9]) == sum(Decimal(r["qty"]) for r in taker_buys)
    agg = http_get(f"{sim.http_url}/api/v3/aggTrades?symbol=BTCUSDT&fromId={first}&limit=3")[2]
    assert [(a["a"], a["f"], a["l"], a["p"], a["q"], a["T"]) for a in agg] == [
        (r["id"], r["id"], r["id"], r["price"], r["qty"], r["time"]) for r in rows[:3]
    ]


# ---- connection hygiene -------------------------------------------------------------


def raw_ws(port: int, path: str, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket that completes the handshake and then does nothing at all: no reads
    (when ``rcvbuf`` is small, the server's frames back up), no pongs."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    ws_key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_slow_reader_is_dropped_while_others_keep_streaming(make_sim):
    sim = make_sim(rate=9000, max_queue=2000)
    streams = "btcusdt@trade/btcusdt@bookTicker/ethusdt@trade/ethusdt@bookTicker"
    stalled = raw_ws(sim.port, f"/stream?streams={streams}", rcvbuf=4096)
    binance = venue("binance", config(sim, "binance"))
    tape = Tape(binance)
    try:
        with stream(binance.connection_url(["SOL-USDT"], ["trades"])) as ws:
            wait_for(lambda: sim.report()["venues"]["binance"]["slow_drops"] >= 1, 15)
            read(ws, tape, lambda: tape.count("SOL-USDT") >= 2000)
    finally:
        stalled.close()
    assert not tape.gaps
    assert sim.report()["venues"]["binance"]["slow_drops"] == 1


def test_a_client_that_never_answers_pings_is_closed(make_sim):
    sim = make_sim(ping_interval=0.3, ping_timeout=0.3)
    silent = raw_ws(sim.port, "/ws")
    silent.settimeout(60)  # liveness: the server closes it (a recv timeout fails the test)
    try:
        while silent.recv(4096):  # ping frames, then the close, then EOF
            pass
    finally:
        silent.close()
    wait_for(lambda: sim.report()["venues"]["binance"]["open"] == 0, 30)


# ---- Coinbase and Kraken ------------------------------------------------------------


@pytest.mark.parametrize("name", ["coinbase", "kraken", "deribit"])
def test_other_venues_stream_the_same_market_in_their_own_protocol(make_sim, name):
    sim = make_sim()
    adapter = venue(name, config(sim, name))
    tape = Tape(adapter)
    with stream(adapter.connection_url(list(SYMBOLS), ["trades", "quotes"])) as ws:
        for frame in adapter.subscribe_frames(list(SYMBOLS), ["trades", "quotes"]):
            ws.send(frame)
        read(ws, tape, lambda: enough(tape, 200)() and "heartbeat" in tape.controls)
        sim.inject("malformed", venue=name, symbol="ETH-USDT", kind="nan_price")
        sim.inject("malformed", venue=name, symbol="SOL-USDT", kind="missing_field")
        read(ws, tape, lambda: len(tape.rejected) == 2)
    assert "ack" in tape.controls and not tape.gaps
    for sym in SYMBOLS:  # a Coinbase snapshot (newest first) may precede the updates
        ids = sorted({t.trade_id for t in tape.trades[sym]} | set(tape.dups.get(sym, [])))
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert {q.symbol for q in tape.quotes} == set(SYMBOLS)
    assert all(q.bid_price < q.ask_price for q in tape.quotes)

    # one market behind every venue: the same ids carry the same trades (taker side too)
    sample = tape.trades["BTC-USDT"][-20:]
    binance = BinanceRest(config(sim, "binance"))
    again = binance.historical_trades("BTC-USDT", from_id=sample[0].trade_id, limit=20)
    assert [key(t) for t in again] == [key(t) for t in sample]

    ledger = sim.report()["venues"][name]["symbols"]
    sent = [
        text for sym in ("ETH-USDT", "SOL-USDT") for text in ledger[sym]["malformed"][0]["texts"]
    ]
    assert sorted(tape.rejected) == sorted(sent)


# ---- as a process -------------------------------------------------------------------


def test_command_line_process_takes_faults_is_controlled_over_http_and_stops_cleanly():
    args = ["--rate", "200", "--symbols", "BTC-USDT", "--throttle", "1"]
    with SimulatorProcess(*args, "--fault", "binance:gap_every=5,dup_every=7") as proc:
        report = proc.report()
        assert (
            report["venues"]["binance"]["faults"] | {"gap_every": 5, "dup_every": 7}
            == (report["venues"]["binance"]["faults"])
        )
        assert report["rest"]["throttle_left"] == 1
        assert proc.set_faults("kraken", drop_every=9)["faults"]["drop_every"] == 9
        assert proc.inject("gap", symbol="BTC-USDT", n=2)["symbols"] == ["BTC-USDT"]
        with pytest.raises(RuntimeError, match="unknown fault setting"):
            proc.set_faults("binance", nope=1)
        with pytest.raises(RuntimeError, match="unknown fault action"):
            proc.inject("explode")
    assert proc.proc.returncode == 0
    with pytest.raises(RuntimeError, match="bad fault"):
        SimulatorProcess("--fault", "binance:nope=1")


def test_a_plain_get_cannot_change_the_simulator(make_sim):
    """A link (or a page in a local browser) is a plain GET without custom headers: the
    endpoints that change the simulator refuse it and change nothing; reads still work."""
    sim = make_sim(rate=50)
    base = f"http://127.0.0.1:{sim.port}/_sim"
    before = sim.report()["venues"]["binance"]["faults"]
    for path in ("faults?venue=binance&gap_every=3", "inject/shutdown?venue=binance"):
        status, _, body = http_get(f"{base}/{path}")
        assert status == 403 and "X-Sim-Control" in body["error"], (path, status, body)
    assert sim.report()["venues"]["binance"]["faults"] == before
    assert http_get(f"{base}/report")[0] == 200
    wrong = urllib.request.Request(
        f"{base}/faults?venue=binance&gap_every=3", headers={"X-Sim-Control": "guess"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 403
    right = urllib.request.Request(wrong.full_url, headers={"X-Sim-Control": sim.control_token})
    with urllib.request.urlopen(right, timeout=10) as r:
        assert json.loads(r.read())["faults"]["gap_every"] == 3


def test_coinbase_kraken_and_deribit_rest_backfill_returns_the_stream_history(make_sim):
    from tasks.venues.coinbase import CoinbaseRest
    from tasks.venues.deribit import DeribitRest
    from tasks.venues.kraken import KrakenRest

    sim = make_sim(rate=2400)  # 800 a second per symbol: Kraken needs two pages
    time.sleep(2.2)
    binance = BinanceRest(config(sim, "binance"))
    first = sim.report()["markets"]["ETH-USDT"]["first_id"]
    truth = list(binance.trades_by_id("ETH-USDT", first, first + 1499))
    start_us, end_us = truth[0].event_us, truth[-1].event_us  # [start, end)
    expected = [key(t) for t in truth if t.event_us < end_us]
    fast = {"sleep": lambda s: None}
    coinbase = CoinbaseRest(config(sim, "coinbase"), Http(sim.http_url, **fast))
    got = sorted(coinbase.trades_by_time("ETH-USDT", start_us, end_us), key=key)
    assert [key(t) for t in got] == expected
    kraken = KrakenRest(config(sim, "kraken"))
    kraken.http.min_interval_s = 0
    got = list(kraken.trades_by_time("ETH-USDT", start_us, end_us))
    assert [key(t) for t in got] == expected
    assert sim.report()["rest"]["kraken_requests"] >= 2
    deribit = DeribitRest(config(sim, "deribit"), Http(sim.http_url, **fast))
    got = list(deribit.trades_by_time("ETH-USDT", start_us, end_us))
    assert [key(t) for t in got] == expected
    again = deribit.trades_by_id("ETH-USDT", first, first + 1499)  # gap repair's path
    assert [key(t) for t in again] == [key(t) for t in truth]


# ---- Finnhub: a venue without trade ids ---------------------------------------------

FINNHUB_SYMBOLS = ("BTC-USDTBINANCE", "AAPL-USD")


def finnhub_config(sim: Simulator, token: str) -> VenueConfig:
    return VenueConfig("finnhub", sim.ws_url("finnhub"), sim.http_url, credential=token)


def test_finnhub_refuses_a_missing_or_wrong_token_at_the_handshake(make_sim):
    from websockets.exceptions import InvalidStatus

    sim = make_sim(symbols=FINNHUB_SYMBOLS, rate=50)
    for url in (sim.ws_url("finnhub"), sim.ws_url("finnhub") + "?token=guess"):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=5)
        assert refused.value.response.status_code == 401
    with pytest.raises(ValueError, match="no ids"):
        sim.set_faults("finnhub", gap_every=10)
    with pytest.raises(ValueError, match="no ids"):
        sim.inject("gap", venue="finnhub")


def test_finnhub_streams_trades_pings_and_repeats_with_the_same_dedupe_key(make_sim):
    """A duplicated trade carries the same content, so the same key: one row in the sinks.
    Malformed frames are rejected exactly as the ledger names them."""
    from tasks.venues.finnhub import SIMULATOR_TOKEN

    sim = make_sim(symbols=FINNHUB_SYMBOLS, rate=400)
    adapter = venue("finnhub", finnhub_config(sim, SIMULATOR_TOKEN))
    symbols = list(FINNHUB_SYMBOLS)
    keys: dict[str, list[int]] = {s: [] for s in symbols}
    trades: list[Trade] = []
    rejected: list[str] = []
    controls: list[str] = []

    def feed(raw: str) -> None:
        try:
            parsed = adapter.parse(raw, now_us())
        except FeedError:
            rejected.append(raw)
            return
        if parsed.control:
            controls.append(parsed.control)
        for t in parsed.events:
            trades.append(t)
            keys[t.symbol].append(t.trade_id)

    def until(done: Callable[[], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the stream"
            feed(ws.recv(timeout=left))

    with stream(adapter.connection_url(symbols, ["trades"])) as ws:
        for frame in adapter.subscribe_frames(symbols, ["trades"]):
            ws.send(frame)
        until(lambda: all(len(k) >= 100 for k in keys.values()) and "heartbeat" in controls)
        sim.inject("dup", venue="finnhub", symbol="AAPL-USD", n=3)
        sim.inject("malformed", venue="finnhub", symbol="BTC-USDTBINANCE", kind="nan_price")
        sim.inject("malformed", venue="finnhub", symbol="AAPL-USD", kind="missing_field")
        aapl = keys["AAPL-USD"]
        until(lambda: len(rejected) == 2 and len(aapl) - len(set(aapl)) >= 3)
    assert all(t.side == "unknown" and t.venue == "finnhub" for t in trades)
    report = sim.report()["venues"]["finnhub"]["symbols"]
    assert report["AAPL-USD"]["duplicated_count"] == 3
    repeats = Counter(keys["AAPL-USD"])
    assert sum(n - 1 for n in repeats.values()) >= 3  # each dup: the same key again
    # what the sinks keep, (venue, symbol, trade_id) once each, is every distinct trade
    stored = {(t.venue, t.symbol, t.trade_id): key(t) for t in trades}
    assert len(stored) == len({key(t) for t in trades})
    sent = [text for sym in symbols for text in report[sym]["malformed"][0]["texts"]]
    assert sorted(rejected) == sorted(sent)


def test_finnhub_candles_over_rest_need_the_token(make_sim):
    from tasks.venues.finnhub import SIMULATOR_TOKEN, FinnhubRest
    from tasks.venues.http import RestError

    sim = make_sim(symbols=FINNHUB_SYMBOLS, rate=600)
    time.sleep(1.5)
    end_us = (now_us() // 60_000_000 + 1) * 60_000_000
    fast = {"sleep": lambda s: None}
    client = FinnhubRest(finnhub_config(sim, SIMULATOR_TOKEN), Http(sim.http_url, **fast))
    for symbol in FINNHUB_SYMBOLS:
        candles = list(client.klines(symbol, "1m", end_us - 120_000_000, end_us))
        assert candles and all(c.symbol == symbol and c.source == "venue" for c in candles)
        assert all(c.low <= min(c.open, c.close) <= max(c.open, c.close) <= c.high for c in candles)
        assert all(c.volume > 0 for c in candles)
    assert sim.report()["rest"]["finnhub_requests"] == 2
    wrong = FinnhubRest(finnhub_config(sim, "guess"), Http(sim.http_url, **fast))
    with pytest.raises(RestError) as refused:
        list(wrong.klines("AAPL-USD", "1m", end_us - 60_000_000, end_us))
    assert refused.value.status == 401
