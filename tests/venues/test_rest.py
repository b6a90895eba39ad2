"""REST history clients against a real HTTP server on 127.0.0.1 serving venue-format pages,
plus the failures a polite client must survive: 429/418 Retry-After, 5xx, timeouts,
hard 4xx and a used-weight header near the limit."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tasks.core.codec import validate
from tasks.core.events import Candle
from tasks.venues.base import FeedError, VenueConfig
from tasks.venues.binance import BinanceRest
from tasks.venues.coinbase import CoinbaseRest
from tasks.venues.http import Http, RestError
from tasks.venues.kraken import KrakenRest

T0_MS = 1_699_999_980_000  # 2023-11-14T22:13:00Z, a whole minute
FIRST_ID, LAST_ID = 1000, 3499  # Binance BTCUSDT trades, one every 10 s


def binance_trade(i: int) -> dict:
    return {
        "id": i, "price": f"{30000 + i % 97}.{i % 100:02d}", "qty": f"0.{i:05d}",
        "quoteQty": "1", "time": T0_MS + (i - FIRST_ID) * 10_000, "isBuyerMaker": i % 2 == 0,
        "isBestMatch": True,
    }  # fmt: skip


BINANCE = [binance_trade(i) for i in range(FIRST_ID, LAST_ID + 1)]
COINBASE_T0 = 1_700_000_000  # seconds
# Up to three trades a second over ten seconds; ETH-USD has five in one second.
COINBASE = {
    "BTC-USD": [(100 + n, COINBASE_T0 + n // 3, (n % 3) * 250_000) for n in range(30)],
    "ETH-USD": [(200 + n, COINBASE_T0, n * 1000) for n in range(5)],
}
KRAKEN = [(f"{26000 + n}.5", f"0.{n + 1:03d}", f"{1_700_000_000 + n}.{n:04d}", "bs"[n % 2], n + 1)
          for n in range(8)]  # fmt: skip


class Venue(ThreadingHTTPServer):
    """Serves Binance, Coinbase and Kraken formats; ``script[path]`` holds canned
    (status, headers, body) replies served before the real ones."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: dict[str, list[tuple[int, dict[str, str], object]]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.weight = "1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: Venue

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.server.requests.append((u.path, q))
        if self.server.script.get(u.path):
            status, headers, body = self.server.script[u.path].pop(0)
        elif u.path == "/slow":
            time.sleep(0.5)
            status, headers, body = 200, {}, []
        else:
            status, headers, body = 200, {}, self.route(u.path, q)
            if isinstance(body, tuple):
                status, body = body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-MBX-USED-WEIGHT-1m", self.server.weight)
        for k, v in headers.items():
            self.send_header(k, v)
        data = json.dumps(body).encode()
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self, path, q):
        if path.startswith("/api/v3/") and "brokerage" not in path and q.get("symbol") != "BTCUSDT":
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        limit = int(q.get("limit", 500))
        if path == "/api/v3/historicalTrades":
            start = int(q.get("fromId", LAST_ID - limit + 1))
            return [t for t in BINANCE if t["id"] >= start][:limit]
        if path == "/api/v3/trades":
            return BINANCE[-limit:]
        if path == "/api/v3/aggTrades":
            lo, hi = int(q["startTime"]), int(q["endTime"])
            if hi - lo >= 3_600_000:
                return 400, {
                    "code": -1127,
                    "msg": "More than 1 hours between startTime and endTime.",
                }
            rows = [t for t in BINANCE if lo <= t["time"] <= hi][:limit]
            return [{"a": t["id"], "p": t["price"], "q": t["qty"], "f": t["id"], "l": t["id"],
                     "T": t["time"], "m": t["isBuyerMaker"], "M": True} for t in rows]  # fmt: skip
        if path == "/api/v3/klines":
            lo, hi = int(q["startTime"]), int(q["endTime"])
            first = -(-lo // 60_000) * 60_000
            opens = [t for t in range(first, hi + 1, 60_000) if T0_MS <= t < T0_MS + 3_000 * 60_000]
            return [self.kline(t) for t in opens[:limit]]
        if path.startswith("/api/v3/brokerage/market/products/"):
            product = path.split("/")[-2]
            lo, hi = int(q["start"]), int(q["end"])
            rows = [r for r in COINBASE.get(product, []) if lo <= r[1] <= hi]  # end inclusive
            rows.sort(key=lambda r: (r[1], r[2]), reverse=True)
            return {"trades": [self.coinbase(product, *r) for r in rows[: int(q["limit"])]],
                    "best_bid": "1", "best_ask": "2"}  # fmt: skip
        if path == "/0/public/Trades":
            since = int(q["since"])
            rows = [r for r in KRAKEN if int(Decimal(r[2]) * 10**9) > since][:3]
            last = int(Decimal(rows[-1][2]) * 10**9) if rows else since
            rows = [[p, v, float(t), s, "l", "", i] for p, v, t, s, i in rows]  # JSON numbers
            return {"error": [], "result": {"XXBTZUSD": rows, "last": str(last)}}
        return 404, {"code": -1, "msg": "no such path"}

    @staticmethod
    def kline(t):
        n = (t - T0_MS) // 60_000
        volume = "0.00000000" if n % 10 == 3 else f"{n + 1}.50000000"
        quote = "0.00000000" if n % 10 == 3 else f"{(n + 1) * 30000 + 15000}.00000000"
        return [t, "30000.00", "30010.00", "29990.00", "30005.00", volume, t + 59_999, quote,
                0 if n % 10 == 3 else n + 2, "0", "0", "0"]  # fmt: skip

    @staticmethod
    def coinbase(product, tid, second, micros):
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{micros:06d}Z"
        side = "BUY" if tid % 2 else "SELL"
        return {"trade_id": str(tid), "product_id": product, "price": f"{tid}.25", "size": "0.5",
                "time": when, "side": side, "bid": "", "ask": ""}  # fmt: skip


@pytest.fixture
def venue() -> Iterator[Venue]:
    server = Venue()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class FakeTime:
    """A clock that moves only when slept on, so waits are observed, not endured."""

    def __init__(self, now: float = 1_700_000_020.0):
        self.now, self.sleeps = now, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def config(url: str, name: str = "binance") -> VenueConfig:
    return VenueConfig(name, "ws://127.0.0.1:1", url)


def http(url: str, fake: FakeTime, **kw) -> Http:
    return Http(url, sleep=fake.sleep, clock=fake.clock, **kw)


# -- Binance -------------------------------------------------------------------------------


def test_trades_by_id_yields_exactly_the_range_across_pages(venue):
    fake = FakeTime()
    rest = BinanceRest(config(venue.url), http(venue.url, fake))
    trades = list(rest.trades_by_id("BTC-USDT", 1500, 2700))
    assert [t.trade_id for t in trades] == list(range(1500, 2701))
    t = trades[0]
    assert (t.venue, t.symbol, t.venue_symbol, t.side) == ("binance", "BTC-USDT", "BTCUSDT", "sell")
    assert (t.price, t.qty) == (Decimal(BINANCE[500]["price"]), Decimal("0.01500"))
    assert t.event_us == (T0_MS + 500 * 10_000) * 1000 and t.recv_us == int(fake.now * 1e6)
    assert all(validate(x) == x for x in trades)
    pages = [q for p, q in venue.requests if p == "/api/v3/historicalTrades"]
    assert [(q["fromId"], q["limit"]) for q in pages] == [("1500", "1000"), ("2500", "201")]


def test_trades_by_id_refuses_to_hide_a_hole(venue):
    venue.script["/api/v3/historicalTrades"] = [(200, {}, [binance_trade(10), binance_trade(12)])]
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    with pytest.raises(RestError, match="id jumps 11 -> 12"):
        list(rest.trades_by_id("BTC-USDT", 10, 20))
    with pytest.raises(RestError, match="no trades from id 3500"):
        list(rest.trades_by_id("BTC-USDT", 3500, 3600))


def test_trades_by_id_without_an_end_reads_to_the_newest(venue):
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    trades = list(rest.trades_by_id("BTC-USDT", 3000, None))
    assert [t.trade_id for t in trades] == list(range(3000, LAST_ID + 1))
    pages = [q for p, q in venue.requests if p == "/api/v3/historicalTrades"]
    assert [(q["fromId"], q["limit"]) for q in pages] == [("3000", "1000")]  # short: the end
    assert list(rest.trades_by_id("BTC-USDT", LAST_ID + 1, None)) == []  # nothing newer


def test_trades_by_time_is_half_open_and_complete(venue):
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    start_us = (T0_MS + 7_205_000) * 1000  # between trades 1720 and 1721
    end_us = (T0_MS + 20_200_000) * 1000  # exactly trade 3020's time: excluded
    trades = list(rest.trades_by_time("BTC-USDT", start_us, end_us))
    assert [t.trade_id for t in trades] == list(range(1721, 3020))
    windows = [q for p, q in venue.requests if p == "/api/v3/aggTrades"]
    assert (
        len(windows) == 1 and int(windows[0]["endTime"]) - int(windows[0]["startTime"]) < 3_600_000
    )


def test_trades_by_time_scans_hour_windows_until_trades_appear(venue):
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    start_us = (T0_MS - 3 * 3_600_000) * 1000  # three empty hours before the first trade
    trades = list(rest.trades_by_time("BTC-USDT", start_us, (T0_MS + 25_000) * 1000))
    assert [t.trade_id for t in trades] == [1000, 1001, 1002]
    assert len([p for p, _ in venue.requests if p == "/api/v3/aggTrades"]) == 4


def test_recent_trades(venue):
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    assert [t.trade_id for t in rest.recent_trades("BTC-USDT", limit=3)] == [3497, 3498, 3499]


def test_klines_become_venue_candles_with_vwap(venue):
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    candles = list(rest.klines("BTC-USDT", "1m", T0_MS * 1000, (T0_MS + 1500 * 60_000) * 1000))
    assert len(candles) == 1500 and all(validate(c) == c for c in candles)
    assert candles[1] == Candle(
        "binance", "BTC-USDT", "1m", (T0_MS + 60_000) * 1000, Decimal("30000.00"),
        Decimal("30010.00"), Decimal("29990.00"), Decimal("30005.00"), Decimal("2.50000000"),
        3, Decimal("30000"), "venue",
    )  # fmt: skip  # 75000 / 2.5
    empty = candles[3]
    assert (empty.volume, empty.trade_count, empty.vwap) == (0, 0, 0)
    starts = [q["startTime"] for p, q in venue.requests if p == "/api/v3/klines"]
    assert starts == [str(T0_MS), str(T0_MS + 999 * 60_000 + 1)]


def test_bad_rows_raise_feed_error_with_reason(venue):
    bad = {**binance_trade(5), "price": "NaN"}
    venue.script["/api/v3/historicalTrades"] = [(200, {}, [bad]), (200, {}, [{"id": 5}])]
    rest = BinanceRest(config(venue.url), http(venue.url, FakeTime()))
    with pytest.raises(FeedError, match="binance rest trade 'BTCUSDT': price: not finite"):
        rest.historical_trades("BTC-USDT", 5)
    with pytest.raises(FeedError, match="binance rest trade: bad row"):
        rest.historical_trades("BTC-USDT", 5)


# -- the polite client ---------------------------------------------------------------------


def test_429_retry_after_is_honoured_in_real_time(venue):
    venue.script["/api/v3/trades"] = [
        (429, {"Retry-After": "1"}, {"code": -1003, "msg": "Too many"})
    ]
    rest = BinanceRest(config(venue.url))
    t0 = time.monotonic()
    assert len(rest.recent_trades("BTC-USDT", limit=2)) == 2
    assert 1.0 <= time.monotonic() - t0 < 60  # waited the second asked for, not a default backoff
    assert len(venue.requests) == 2


def test_418_with_a_long_ban_fails_at_once(venue):
    venue.script["/api/v3/trades"] = [
        (418, {"Retry-After": "3600"}, {"code": -1003, "msg": "banned"})
    ]
    fake = FakeTime()
    with pytest.raises(RestError, match=r"HTTP 418.*retry after 3600 s") as exc:
        BinanceRest(config(venue.url), http(venue.url, fake)).recent_trades("BTC-USDT")
    assert exc.value.status == 418 and fake.sleeps == [] and len(venue.requests) == 1


def test_5xx_is_retried_with_bounded_jittered_backoff(venue):
    venue.script["/api/v3/trades"] = [(500, {}, {}), (502, {}, {}), (503, {}, {})]
    fake = FakeTime()
    rest = BinanceRest(config(venue.url), http(venue.url, fake, backoff_s=0.5, attempts=4))
    assert len(rest.recent_trades("BTC-USDT", limit=1)) == 1
    assert len(fake.sleeps) == 3
    assert all(0 <= s <= 0.5 * 2**n for n, s in enumerate(fake.sleeps))


def test_gives_up_after_n_attempts_with_a_clear_error(venue):
    venue.script["/api/v3/trades"] = [(503, {}, {"msg": "busy"})] * 3
    fake = FakeTime()
    with pytest.raises(RestError, match=r"gave up after 3 attempts; last: HTTP 503") as exc:
        BinanceRest(config(venue.url), http(venue.url, fake, attempts=3)).recent_trades("BTC-USDT")
    assert exc.value.status == 503 and len(fake.sleeps) == 2


def test_timeouts_are_retried_then_reported(venue):
    fake = FakeTime()
    client = http(venue.url, fake, timeout_s=0.1, attempts=2)
    with pytest.raises(RestError, match=r"gave up after 2 attempts; last: .*timed out"):
        client.get_json("/slow")
    assert len([p for p, _ in venue.requests if p == "/slow"]) == 2


def test_client_errors_are_not_retried(venue):
    fake = FakeTime()
    rest = BinanceRest(config(venue.url), http(venue.url, fake))
    with pytest.raises(RestError, match=r"HTTP 400: .*Invalid symbol") as exc:
        rest.recent_trades("ETH-USDT")
    assert exc.value.status == 400 and fake.sleeps == [] and len(venue.requests) == 1


def test_used_weight_near_the_limit_waits_for_the_next_minute(venue):
    fake = FakeTime(now=1_700_000_020.0)  # 40 s into a minute
    rest = BinanceRest(config(venue.url), http(venue.url, fake))
    venue.weight = "5500"  # over 90% of 6000
    rest.recent_trades("BTC-USDT", limit=1)
    assert fake.sleeps == []
    venue.weight = "12"
    rest.recent_trades("BTC-USDT", limit=1)
    assert fake.sleeps == [pytest.approx(20.5)]


def test_min_interval_paces_requests(venue):
    fake = FakeTime()
    client = http(venue.url, fake, min_interval_s=1.0)
    for _ in range(3):
        client.get_json("/api/v3/trades", {"symbol": "BTCUSDT", "limit": 1})
    assert fake.sleeps == [pytest.approx(1.0)] * 2


def test_connection_refused_is_retried_then_reported():
    fake = FakeTime()
    client = http("http://127.0.0.1:9", fake, attempts=2, timeout_s=1)
    with pytest.raises(RestError, match="gave up after 2 attempts; last: URLError"):
        client.get_json("/api/v3/trades")


# -- Coinbase and Kraken -------------------------------------------------------------------


def test_coinbase_pages_backwards_without_duplicates(venue):
    rest = CoinbaseRest(config(venue.url, "coinbase"), http(venue.url, FakeTime()))
    start_us, end_us = (COINBASE_T0 + 1) * 1_000_000, (COINBASE_T0 + 8) * 1_000_000 + 300_000
    trades = list(rest.trades_by_time("BTC-USD", start_us, end_us, limit=4))
    expected = [tid for tid, s, us in COINBASE["BTC-USD"] if start_us <= s * 10**6 + us < end_us]
    assert sorted(t.trade_id for t in trades) == expected
    assert len(trades) == len(expected) == 23
    first = next(t for t in trades if t.trade_id == 103)
    assert (first.side, first.price, first.symbol) == ("sell", Decimal("103.25"), "BTC-USD")
    assert all(validate(t) == t for t in trades)


def test_coinbase_says_when_one_second_holds_more_than_a_page(venue):
    rest = CoinbaseRest(config(venue.url, "coinbase"), http(venue.url, FakeTime()))
    with pytest.raises(RestError, match="over 4 trades in one second"):
        list(
            rest.trades_by_time("ETH-USD", COINBASE_T0 * 10**6, (COINBASE_T0 + 1) * 10**6, limit=4)
        )


def test_kraken_pages_by_last_cursor_and_retries_its_rate_limit(venue):
    venue.script["/0/public/Trades"] = [(200, {}, {"error": ["EGeneral:Too many requests"]})]
    fake = FakeTime()
    rest = KrakenRest(config(venue.url, "kraken"), http(venue.url, fake))
    trades = list(rest.trades_by_time("BTC-USD", 1_700_000_001_000_000, 1_700_000_006_000_000))
    assert [t.trade_id for t in trades] == [2, 3, 4, 5, 6]
    t = trades[0]
    assert (t.symbol, t.venue_symbol, t.price, t.qty, t.side) == (
        "BTC-USD", "BTC/USD", Decimal("26001.5"), Decimal("0.002"), "sell",
    )  # fmt: skip
    assert t.event_us == 1_700_000_001_000_100  # "1700000001.0001" seconds, exactly
    pairs = {q["pair"] for p, q in venue.requests if p == "/0/public/Trades"}
    assert pairs == {"XBTUSD"}
    assert len(fake.sleeps) == 1  # the retried rate-limit answer


def coinbase_us(tid: int) -> int:
    _, second, micros = next(r for r in COINBASE["BTC-USD"] if r[0] == tid)
    return second * 1_000_000 + micros


def kraken_us(tid: int) -> int:
    return int(Decimal(KRAKEN[tid - 1][2]) * 1_000_000)


def test_coinbase_and_kraken_find_trades_by_id_between_two_known_times(venue):
    """Neither venue serves trades by id: gap repair gives the times of the trades around
    the hole (inclusive) and gets exactly the ids asked for, in id order."""
    coinbase = CoinbaseRest(config(venue.url, "coinbase"), http(venue.url, FakeTime()))
    got = coinbase.trades_by_id("BTC-USD", 104, 110, coinbase_us(103), coinbase_us(111))
    assert [t.trade_id for t in got] == list(range(104, 111))
    assert got[0].event_us == coinbase_us(104) and got[0].price == Decimal("104.25")
    kraken = KrakenRest(config(venue.url, "kraken"), http(venue.url, FakeTime()))
    got = kraken.trades_by_id("BTC-USD", 3, 6, kraken_us(2), kraken_us(7))
    assert [t.trade_id for t in got] == [3, 4, 5, 6]
    # without an end: to the newest trade, up to now
    assert [t.trade_id for t in kraken.trades_by_id("BTC-USD", 6, None, kraken_us(5))] == [6, 7, 8]


def test_coinbase_and_kraken_refuse_to_hide_a_hole(venue):
    kraken = KrakenRest(config(venue.url, "kraken"), http(venue.url, FakeTime()))
    with pytest.raises(RestError, match=r"1 of ids 7\.\.9 missing .* \(first: 9\)"):
        kraken.trades_by_id("BTC-USD", 7, 9, kraken_us(6), kraken_us(8))
    with pytest.raises(RestError, match="needs the time of the trade before it"):
        kraken.trades_by_id("BTC-USD", 3, 6)
    coinbase = CoinbaseRest(config(venue.url, "coinbase"), http(venue.url, FakeTime()))
    late = coinbase_us(120)  # a window that starts after the trades asked for
    with pytest.raises(RestError, match=r"of ids 104\.\.110 missing"):
        coinbase.trades_by_id("BTC-USD", 104, 110, late, late + 1_000_000)
