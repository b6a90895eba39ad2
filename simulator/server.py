"""The simulator: one asyncio loop, one port, five venues' protocols over one market.

A pacing task wakes every ``tick_ms``, advances every symbol's market by the elapsed
time (so the configured rate holds however late the loop wakes), passes each venue's
share through its stream faults and hands the result to the venue for formatting and
fan-out. WebSocket upgrades are routed by path to a venue. Plain HTTP GETs on the same
port (websockets' ``process_request`` hook) serve REST history (Binance under
``/api/v3``; Coinbase's public trades at ``/api/v3/brokerage/market/products/{id}/ticker``;
Kraken's at ``/0/public/Trades``; Deribit's under ``/api/v2/public/``; Finnhub's candles at
``/api/v1/<stock|crypto|forex>/candle``) and the control plane under ``/_sim``:

    GET /_sim/health
    GET /_sim/report
    GET /_sim/faults?venue=binance[&gap_every=N&gap_size=K&dup_every=N&malformed_every=N
                     &drop_every=N&shutdown_every=N&stall_every=N&stall_s=S]
    GET /_sim/inject/<drop|shutdown|stall|gap|dup|malformed|throttle
                      |book_gap|book_checksum|stale_snapshot>
                     ?venue=binance[&symbol=BTC-USDT][&n=1][&kind=nan_price][&seconds=2]
                     [&retry_after=1]
    GET /_sim/book?symbol=BTC-USDT[&event_us=N][&depth=10]

(The websockets HTTP parser accepts only GET, so the control plane is GET with query
parameters.) The endpoints that change the simulator (``faults``, ``inject``, and
``book``, which starts a symbol's book if it had none) answer only
a request carrying header ``X-Sim-Control`` equal to the process's control token
(``TAPELINE_SIM_CONTROL_TOKEN``; a random one when unset): a link or a page in a browser
cannot set a header on a plain GET, and a cross-origin request that could would need a
preflight, which this server never answers. ``simulator.process`` sends it.

Use it in-process with ``Simulator(...).start()`` / ``.stop()`` (a
background thread), from asyncio with ``await Simulator(...).run()``, or as a process
with ``python -m simulator`` (see ``simulator.process``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import hmac
import http
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from simulator.book import book_of
from simulator.faults import BOOK_FAULTS, FaultSettings, StreamFaults
from simulator.hub import Hub
from simulator.market import Market, MarketParams, instrument
from simulator.venues import VenueBase
from simulator.venues.binance import Binance, BinanceRest
from simulator.venues.coinbase import Coinbase, CoinbaseRest
from simulator.venues.deribit import Deribit, DeribitRest
from simulator.venues.finnhub import Finnhub, FinnhubRest
from simulator.venues.kraken import Kraken, KrakenRest
from simulator.wire import now_ms

log = logging.getLogger("simulator")
VENUES = ("binance", "coinbase", "kraken", "deribit", "finnhub")
# Venues whose trades carry no ids: a skipped trade is invisible and unrepairable there,
# so gap faults (which the ledger would count as losses nobody can name) are refused.
NO_IDS = frozenset({"finnhub"})
T = TypeVar("T")


@dataclass
class SimConfig:
    symbols: tuple[str, ...] = ("BTC-USDT", "ETH-USDT")
    rate: float = 50.0  # mean trades per second over all symbols (bursts come on top)
    host: str = "127.0.0.1"
    port: int = 18765  # 0 picks a free port
    seed: int = 1
    start_id: int = 1_000_000
    # Per-symbol first ids, so a restarted simulator continues where a pipeline's stored
    # history ends instead of reusing ids (symbols not named start at start_id).
    start_ids: dict[str, int] = field(default_factory=dict)
    max_history: int = 2_000_000  # trades kept per symbol for REST
    tick_ms: float = 5.0
    volatility: float = 0.0001
    quote_ratio: float = 0.2
    bursts: bool = True
    max_queue: int = 50_000  # frames queued per connection before it is dropped as slow
    ping_interval: float = 20.0
    ping_timeout: float = 60.0
    shutdown_grace_s: float = 1.0
    weight_limit: int = 6000
    throttle: int = 0  # the first K REST requests get 429
    retry_after_s: int = 1
    faults: dict[str, dict[str, float]] = field(default_factory=dict)  # venue -> settings
    # A past to reconcile against: before serving, each symbol gets ``history_s`` seconds
    # of trades ending now, ``history_rate`` per second over all symbols, evenly spaced.
    history_s: float = 0.0
    history_rate: float = 1.0
    # Keep every symbol's order book from the start (else a book starts when first asked
    # for: a book subscription, a REST depth request or ``book_at``).
    books: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.symbols, str):
            self.symbols = tuple(s for s in self.symbols.split(",") if s)
        self.symbols = tuple(self.symbols)
        if not self.symbols:
            raise ValueError("at least one symbol is needed")
        if self.rate < 0 or self.tick_ms <= 0 or self.max_queue < 1:
            raise ValueError("rate >= 0, tick_ms > 0 and max_queue >= 1 are required")
        if self.history_s < 0 or self.history_rate < 0:
            raise ValueError("history_s >= 0 and history_rate >= 0 are required")
        for venue, values in self.faults.items():
            if venue not in VENUES:
                raise ValueError(f"unknown venue {venue!r}; known: {VENUES}")
            refuse_gaps(venue, values)


def refuse_gaps(venue: str, values: dict[str, Any]) -> None:
    """ValueError for a gap fault on a venue without trade ids (see ``NO_IDS``)."""
    if venue in NO_IDS and float(values.get("gap_every", 0)):
        raise ValueError(
            f"{venue} trades carry no ids: a gap can be neither seen nor repaired, so the"
            " simulator does not inject one (drop, stall, dup and malformed apply)"
        )


CONTROL_HEADER = "X-Sim-Control"
CONTROL_TOKEN_ENV = "TAPELINE_SIM_CONTROL_TOKEN"
_READ_ONLY = frozenset({"health", "report"})


class Simulator:
    """A local exchange speaking Binance, Coinbase Advanced Trade, Kraken v2, Deribit and
    Finnhub."""

    def __init__(self, config: SimConfig | None = None, **overrides: Any):
        if config is None:
            config = SimConfig(**overrides)
        elif overrides:
            config = SimConfig(**(asdict(config) | overrides))
        self.config = config
        self.port = config.port
        self.settings = {v: FaultSettings() for v in VENUES}
        for venue, values in config.faults.items():
            self.settings[venue].update(values)
        self.markets: dict[str, Market] = {}
        self.faults: dict[str, StreamFaults] = {}
        self.venues: dict[str, VenueBase] = {}
        self.hub: Hub | None = None
        self.rest: BinanceRest | None = None
        self.other_rest: list[CoinbaseRest | KrakenRest | DeribitRest | FinnhubRest] = []
        self.finnhub_rest: FinnhubRest | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.control_token = os.environ.get(CONTROL_TOKEN_ENV) or secrets.token_urlsafe(24)
        self._started = 0.0

    # ---- addresses ------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def ws_url(self, venue: str = "binance") -> str:
        """Binance: the base the adapter appends /stream?streams=... to; others: full URL."""
        base = f"ws://{self.config.host}:{self.port}"
        return {
            "binance": base,
            "coinbase": base + "/coinbase",
            "kraken": base + "/kraken",
            "deribit": base + "/deribit",
            "finnhub": base + "/finnhub",
        }[venue]

    def rest_url(self, venue: str = "binance") -> str:
        return self.http_url

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Simulator:
        """Serve from a background thread; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, name="simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("simulator did not start in time")
        if self._error is not None:
            raise RuntimeError(f"simulator failed to start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.run())
        except BaseException as e:  # surfaced to start(); the thread must not die silently
            self._error = e
            log.exception("simulator crashed")
        finally:
            self._ready.set()

    async def run(self, on_ready: Callable[[Simulator], None] | None = None) -> None:
        """Serve until ``stop()``/``request_stop()``; calls ``on_ready`` once listening."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        start = now_ms()
        burst_rate = 0.05 if cfg.bursts else 0.0
        per_symbol = cfg.rate / len(cfg.symbols)
        for sym in cfg.symbols:
            params = MarketParams(
                rate=per_symbol,
                seed=cfg.seed,
                start_id=cfg.start_ids.get(sym, cfg.start_id),
                max_history=cfg.max_history,
                volatility=cfg.volatility,
                quote_ratio=cfg.quote_ratio,
                burst_rate=burst_rate,
            )
            past = int(cfg.history_s * 1000)
            market = Market(instrument(sym), params, start - past)
            market.generate(round(cfg.history_rate / len(cfg.symbols) * cfg.history_s), start)
            if cfg.books:
                book_of(market)
            self.markets[sym] = market
        self.hub = Hub(list(VENUES), self.settings, cfg.max_queue)
        self.hub.shutdown_grace_s = cfg.shutdown_grace_s
        self.faults = {v: StreamFaults(v, self.settings[v]) for v in VENUES}
        for cls in (Binance, Coinbase, Kraken, Deribit, Finnhub):
            venue = cls(self.hub, self.markets, self.faults[cls.name])
            self.venues[cls.name] = venue
            self.hub.shutdown_frame[cls.name] = venue.shutdown_frame
        self.rest = BinanceRest(self.markets, cfg.weight_limit, self.faults["binance"])
        self.rest.throttle_left = cfg.throttle
        self.rest.retry_after_s = cfg.retry_after_s
        self.finnhub_rest = FinnhubRest(self.markets)
        self.other_rest = [
            CoinbaseRest(self.markets),
            KrakenRest(self.markets),
            DeribitRest(self.markets),
            self.finnhub_rest,
        ]
        async with serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self._process_request,
            compression=None,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            close_timeout=2,
            max_size=2**16,
            logger=logging.getLogger("simulator.ws"),
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._started = time.monotonic()
            tasks = [
                asyncio.create_task(self._pace(), name="pace"),
                asyncio.create_task(self._beat(), name="heartbeat"),
            ]
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            try:
                await self._stop.wait()
            finally:
                for t in tasks:
                    t.cancel()
                for venue in VENUES:
                    for c in list(self.hub.clients[venue]):
                        self.hub.close(c, 1001, "simulator stopping")
                server.close()

    def request_stop(self) -> None:
        """Stop from inside the loop (signal handlers)."""
        if self._stop is not None:
            self._stop.set()

    # ---- pacing -------------------------------------------------------------------------

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.config.tick_ms / 1000
        last = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            dt = min(now - last, 1.0)  # after a long pause, do not unload minutes at once
            last = now
            stamp = now_ms()
            for sym, market in self.markets.items():
                trades, quotes = market.advance(dt, stamp)
                if trades or quotes:
                    self._dispatch(sym, trades, quotes, stamp)
                book = market.book  # None unless someone asked for this symbol's book
                if book is not None:
                    updates = book.apply(quotes) if quotes else []
                    for venue in self.venues.values():
                        venue.publish_book(sym, book, updates, stamp)

    def _dispatch(self, sym: str, trades, quotes, stamp: int) -> None:
        for name, venue in self.venues.items():
            items = []
            if trades and venue.has_trade_subscribers(sym):
                items = self.faults[name].apply(sym, trades)
            q = quotes if quotes and venue.has_quote_subscribers(sym) else []
            if items or q:
                venue.publish(sym, items, q, stamp)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            stamp = now_ms()
            for venue in self.venues.values():
                venue.heartbeat(stamp)

    # ---- WebSocket ------------------------------------------------------------------------

    def _venue_for(self, path: str) -> VenueBase | None:
        for venue in self.venues.values():
            if venue.accepts(path):
                return venue
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert self.hub is not None and ws.request is not None
        path, query = _split(ws.request.path)
        venue = self._venue_for(path)
        if venue is None:  # process_request already refused these
            return
        c = self.hub.attach(venue.name, ws)
        try:
            venue.open(c, path, query)
            async for msg in ws:
                if c.closing:
                    break
                venue.receive(c, msg if isinstance(msg, str) else msg.decode("utf-8", "replace"))
        except ConnectionClosed:
            pass
        finally:
            self.hub.detach(c)

    # ---- HTTP -----------------------------------------------------------------------------

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path, query = _split(request.path)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            venue = self._venue_for(path)
            if venue is None:
                return _json(404, {"error": f"no WebSocket endpoint at {path}"})
            refused = venue.refuse(path, query)
            return None if refused is None else _json(*refused)
        try:
            for api in self.other_rest:
                if api is self.finnhub_rest and api.handles(path):  # its token is a header
                    return _json(*api.handle(path, query, now_ms(), request.headers))
                if api.handles(path):
                    status, body = api.handle(path, query, now_ms())
                    return _json(status, body)
            if path.startswith("/api/v3/"):
                assert self.rest is not None
                status, body, headers = self.rest.handle(path, query, now_ms())
                return _json(status, body, headers)
            if path.startswith("/_sim/"):
                what = path[len("/_sim/") :]
                if what not in _READ_ONLY and not hmac.compare_digest(
                    request.headers.get(CONTROL_HEADER, ""), self.control_token
                ):
                    return _json(
                        403,
                        {
                            "error": f"/_sim/{what} changes the simulator: send"
                            f" header {CONTROL_HEADER} with its control token"
                        },
                    )
                return _json(200, self._control(what, query))
        except ValueError as e:
            return _json(400, {"error": str(e)})
        return _json(404, {"error": f"nothing at {path}"})

    def _control(self, what: str, query: dict[str, str]) -> dict[str, Any]:
        if what == "health":
            return {"ok": True, "port": self.port}
        if what == "report":
            return self._report()
        if what == "faults":
            venue = query.pop("venue", "binance")
            return self._set_faults(venue, query)
        if what.startswith("inject/"):
            args = dict(query)
            return self._inject(
                what[len("inject/") :],
                args.pop("venue", "binance"),
                args.pop("symbol", None),
                int(args.pop("n", 1)),
                args.pop("kind", None),
                float(args["seconds"]) if "seconds" in args else None,
                int(args["retry_after"]) if "retry_after" in args else None,
            )
        if what == "book":
            symbol = query.get("symbol", "")
            event_us = int(query["event_us"]) if query.get("event_us") else now_ms() * 1000
            book = self._book_at(symbol, event_us, int(query.get("depth") or 10))
            for side in ("bids", "asks"):
                book[side] = [[str(p), str(q)] for p, q in book[side]]
            return book
        raise ValueError(f"unknown control endpoint /_sim/{what}")

    # ---- control (loop thread) ----------------------------------------------------------

    def _set_faults(self, venue: str, values: dict[str, Any]) -> dict[str, Any]:
        if venue not in self.settings:
            raise ValueError(f"unknown venue {venue!r}; known: {VENUES}")
        refuse_gaps(venue, values)
        self.settings[venue].update(values)  # in place: writers hold a reference
        return {"venue": venue, "faults": self.settings[venue].to_dict()}

    def _inject(
        self,
        action: str,
        venue: str,
        symbol: str | None,
        n: int,
        kind: str | None,
        seconds: float | None,
        retry_after: int | None,
    ) -> dict[str, Any]:
        assert self.hub is not None and self.rest is not None
        if venue not in VENUES:
            raise ValueError(f"unknown venue {venue!r}; known: {VENUES}")
        if symbol is not None and symbol not in self.markets:
            raise ValueError(f"unknown symbol {symbol!r}; simulated: {list(self.markets)}")
        if n < 1:
            raise ValueError("n must be >= 1")
        done: dict[str, Any] = {"action": action, "venue": venue}
        if action == "drop":
            done["connections"] = self.hub.drop_all(venue)
        elif action == "shutdown":
            done["connections"] = self.hub.shutdown_all(venue)
        elif action == "stall":
            done["connections"] = self.hub.stall_all(venue, seconds if seconds is not None else 2.0)
        elif action in ("gap", "dup", "malformed"):
            if action == "gap":
                refuse_gaps(venue, {"gap_every": n})
            targets = [symbol] if symbol else list(self.markets)
            for sym in targets:
                self.faults[venue].inject(sym, action, n, kind)
            done["symbols"] = targets
        elif action in BOOK_FAULTS:
            if venue not in BOOK_FAULTS[action]:
                raise ValueError(f"{action} applies to {', '.join(BOOK_FAULTS[action])}")
            targets = [symbol] if symbol else list(self.markets)
            for sym in targets:
                self.faults[venue].inject(sym, action, n, None)
            done["symbols"] = targets
        elif action == "throttle":
            self.rest.throttle_left += n
            if retry_after is not None:
                self.rest.retry_after_s = retry_after
            done["throttle_left"] = self.rest.throttle_left
        else:
            raise ValueError(f"unknown fault action {action!r}")
        return done

    def _book_at(self, symbol: str, event_us: int, depth: int) -> dict[str, Any]:
        market = self.markets.get(symbol)
        if market is None:
            raise ValueError(f"unknown symbol {symbol!r}; simulated: {list(self.markets)}")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        book = book_of(market)
        levels = book.at(event_us // 1000, depth)
        return {
            "update_id": levels.update_id,
            "event_us": levels.event_ms * 1000,
            "bids": book.decimals(levels.bids),
            "asks": book.decimals(levels.asks),
        }

    def _report(self) -> dict[str, Any]:
        assert self.hub is not None and self.rest is not None
        markets = {
            sym: {
                "first_id": m.first_id,
                "last_id": m.last_id,
                "generated": m.generated,
                "history_first_id": m.history_first_id,
            }
            for sym, m in self.markets.items()
        }
        venues = {}
        for name in VENUES:
            ledgers = self.faults[name]
            venues[name] = asdict(self.hub.counters[name]) | {
                "faults": self.settings[name].to_dict(),
                "symbols": {
                    sym: markets[sym] | ledgers.ledger(sym).to_dict() for sym in self.markets
                },
            }
        rest = self.rest
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "rate": self.config.rate,
            "markets": markets,
            "venues": venues,
            "rest": {
                "requests": rest.requests,
                "throttled": rest.throttled,
                "rate_limited": rest.rate_limited,
                "throttle_left": rest.throttle_left,
                "coinbase_requests": self.other_rest[0].requests,
                "kraken_requests": self.other_rest[1].requests,
                "deribit_requests": self.other_rest[2].requests,
                "finnhub_requests": self.other_rest[3].requests,
            },
        }

    # ---- control (any thread) -----------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = self._loop
        if loop is None or not self._ready.is_set():
            raise RuntimeError("simulator is not running")
        try:
            if asyncio.get_running_loop() is loop:
                return fn(*args)
        except RuntimeError:
            pass
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def report(self) -> dict[str, Any]:
        """Per venue and symbol: ids generated and sent, gaps, duplicates, malformed frames
        (with their text), disconnects, shutdowns; plus REST counters."""
        return self._call(self._report)

    def book_at(self, symbol: str, event_us: int, depth: int = 10) -> dict[str, Any]:
        """The truth every venue's book channel shows: ``symbol``'s best ``depth``
        levels a side as of its newest book update with event time <= ``event_us``:
        ``{"update_id", "event_us", "bids": [[price, qty], ...] high to low, "asks": low
        to high}``, exact Decimals. Binance's ``U``..``u`` and ``lastUpdateId`` are these
        update ids; Kraken's ``timestamp`` and Coinbase's ``event_time`` these event
        times. Starts the symbol's book if it had none; ValueError for a time older than
        the updates kept (20,000 per symbol)."""
        return self._call(self._book_at, symbol, event_us, depth)

    def set_faults(self, venue: str = "binance", **settings: float) -> dict[str, Any]:
        """Change standing faults, e.g. ``set_faults('binance', gap_every=100)``."""
        return self._call(self._set_faults, venue, settings)

    def inject(
        self,
        action: str,
        venue: str = "binance",
        symbol: str | None = None,
        n: int = 1,
        kind: str | None = None,
        seconds: float | None = None,
        retry_after: int | None = None,
    ) -> dict[str, Any]:
        """One-shot fault: drop, shutdown, stall, gap, dup, malformed, throttle; and for
        books (per venue, see ``BOOK_FAULTS``): book_gap, book_checksum, stale_snapshot."""
        return self._call(self._inject, action, venue, symbol, n, kind, seconds, retry_after)


def _split(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    h = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", "application/json;charset=UTF-8"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
    )
    for k, v in (headers or {}).items():
        h[k] = v
    return Response(status, http.HTTPStatus(status).phrase, h, data)
