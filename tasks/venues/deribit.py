"""Deribit JSON-RPC 2.0 over WebSocket (API v2): ``trades`` and ``quote`` channels.

Trade ids: Deribit's ``trade_id`` is a string, but every trade also carries
``trade_seq``, a sequence number contiguous per instrument, and REST serves trades by
sequence range (``start_seq``/``end_seq``). So ``trade_seq`` is the Trade's ``trade_id``:
the natural key (venue, symbol, trade_id) stays unique because a sequence is per
instrument, and the shared gap repair (``sequential_ids``) detects and refills holes
exactly as for Binance.

Channels: ``trades.<instrument>.100ms`` (the ``raw`` interval is served only to
authenticated connections; ``100ms`` batches every trade, it drops none) and
``quote.<instrument>`` (best bid/ask on every change). Prices and amounts are JSON
numbers, read exactly by ``loads``. ``amount`` is what the venue reports: USD for inverse
futures and perpetuals, the base coin for options, spot and linear instruments.

Heartbeats: the first frame asks for ``public/set_heartbeat`` every ``HEARTBEAT_S``; the
venue then sends ``test_request`` notifications and closes the socket unless each is
answered with ``public/test``, which ``parse`` returns as ``Parsed.reply``. The beats also
keep a quiet instrument's connection under the stall watchdog.

Symbols: the platform's canonical form is BASE-QUOTE (``tasks.core.params``), so the
instrument kind is written into the quote part; inverse instruments are quoted in USD::

    BTC-PERPETUAL          <-> BTC-USDPERP          (perpetual)
    ETH_USDC-PERPETUAL     <-> ETH-USDCPERP         (linear perpetual)
    BTC-27DEC24            <-> BTC-USD27DEC24       (future)
    BTC-27DEC24-100000-C   <-> BTC-USD27DEC24100000C (option; strike, then C or P)
    XRP_USDC-30JUN23-0d625-C <-> XRP-USDC30JUN230D625C (``d`` is the strike's decimal point)
    BTC_USDC               <-> BTC-USDC             (spot)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from tasks.core.events import Quote, Trade
from tasks.venues.base import FeedError, Parsed, VenueConfig, VenueSpec
from tasks.venues.http import Http, RestError, by_id_from, contiguous, now_us
from tasks.venues.parsing import Adapter, bad_rows, build, loads, missing_fields, ms_to_us

CONFIG = VenueConfig("deribit", "wss://www.deribit.com/ws/api/v2", "https://www.deribit.com")
# Public (unauthenticated) REST calls draw on a per-IP credit pool that sustains about 20
# non-matching-engine requests a second; gap repair and backfill share it with anyone
# else behind that IP, so a quarter of it (5 a second) leaves room and never waits on a ban.
REST_INTERVAL_S = 0.2
REST_PAGE = 1000  # the most trades one REST call returns
HEARTBEAT_S = 10  # the venue's minimum; well inside the connection's 30 s stall watchdog
TRADES_INTERVAL = "100ms"
TEST_REPLY = '{"jsonrpc":"2.0","id":0,"method":"public/test","params":{}}'
SIDES = frozenset({"buy", "sell"})
Kind = Literal["spot", "perpetual", "future", "option"]

_ASSET = r"[A-Z0-9]+"
_EXPIRY = r"\d{1,2}[A-Z]{3}\d{2}"
_STRIKE = r"\d+(?:d\d+)?"
_VENUE = re.compile(
    rf"(?P<base>{_ASSET})(?:_(?P<quote>[A-Z]+))?"
    rf"(?:-(?P<perp>PERPETUAL)|-(?P<expiry>{_EXPIRY})(?:-(?P<strike>{_STRIKE})-(?P<cp>[CP]))?)?"
)
_CANONICAL = re.compile(
    rf"(?P<base>{_ASSET})-(?P<quote>[A-Z]+?)"
    rf"(?:(?P<perp>PERP)|(?P<expiry>{_EXPIRY})(?:(?P<strike>\d+(?:D\d+)?)(?P<cp>[CP]))?)?"
)


@dataclass(frozen=True, slots=True)
class Instrument:
    """One Deribit instrument, whichever way it is spelled."""

    kind: Kind
    base: str
    quote: str
    expiry: str = ""  # DMMMYY, as the venue writes it
    strike: str = ""  # with ``d`` as the decimal point
    cp: str = ""  # C or P

    @property
    def venue_symbol(self) -> str:
        if self.kind == "spot":
            return f"{self.base}_{self.quote}"
        head = self.base if self.quote == "USD" else f"{self.base}_{self.quote}"
        if self.kind == "perpetual":
            return f"{head}-PERPETUAL"
        tail = f"-{self.strike}-{self.cp}" if self.kind == "option" else ""
        return f"{head}-{self.expiry}{tail}"

    @property
    def symbol(self) -> str:
        tail = "PERP" if self.kind == "perpetual" else self.expiry + self.strike.upper() + self.cp
        return f"{self.base}-{self.quote}{tail}"


def instrument(name: str, canonical: bool = False) -> Instrument:
    """Read a venue instrument name (or, with ``canonical``, a canonical symbol);
    ValueError when it is neither spot, perpetual, future nor option."""
    m = (_CANONICAL if canonical else _VENUE).fullmatch(name) if type(name) is str else None
    if m is None:
        raise ValueError(f"not a Deribit {'symbol' if canonical else 'instrument'}: {name!r:.40}")
    base, quote, perp, expiry, strike, cp = m.group(
        "base", "quote", "perp", "expiry", "strike", "cp"
    )
    if canonical:
        strike = strike.lower() if strike else ""
    elif quote is None:
        if not (perp or expiry):
            raise ValueError(f"not a Deribit instrument: {name!r:.40}")  # 'BTC': an index
        quote = "USD"  # inverse instruments are named by their coin alone
    if perp:
        return Instrument("perpetual", base, quote)
    if cp:
        return Instrument("option", base, quote, expiry, strike, cp)
    if expiry:
        return Instrument("future", base, quote, expiry)
    return Instrument("spot", base, quote)


class Deribit(Adapter):
    """Venue adapter for Deribit's WebSocket API v2; pure (no sockets, no clock)."""

    symbol_kind = "Deribit instrument"
    symbol_field = "instrument_name"

    def __init__(self, config: VenueConfig | None = None):
        super().__init__(config or CONFIG)
        # subscribe request id -> channels asked for: Deribit acks a channel it does not
        # know by leaving it out of the result, with no error, so the ack is checked.
        self._asked: dict[int, list[str]] = {}

    def to_venue_symbol(self, symbol: str) -> str:
        return instrument(symbol.upper(), canonical=True).venue_symbol

    def to_canonical(self, venue_symbol: str) -> str:
        return instrument(venue_symbol).symbol

    def connection_url(self, symbols: list[str], channels: list[str]) -> str:
        return self.config.ws_url

    def subscribe_frames(self, symbols: list[str], channels: list[str]) -> list[str]:
        """``public/set_heartbeat`` (id 1), then one ``public/subscribe`` per channel
        (ids 2, 3, ...); the caller sends them at config.subscribe_rate_per_s."""
        names = [self.to_venue_symbol(s) for s in symbols]
        frames = [_request(1, "public/set_heartbeat", {"interval": HEARTBEAT_S})]
        for n, c in enumerate(channels, start=2):
            if c == "trades":
                subs = [f"trades.{i}.{TRADES_INTERVAL}" for i in names]
            elif c == "quotes":
                subs = [f"quote.{i}" for i in names]
            else:
                raise ValueError(f"{self.name}: unknown channel {c!r}")
            self._asked[n] = subs
            frames.append(_request(n, "public/subscribe", {"channels": subs}))
        return frames

    def parse(self, raw: str | bytes, recv_us: int) -> Parsed:
        msg = loads(self.name, raw)
        if type(msg) is not dict:
            raise FeedError(f"{self.name}: expected a JSON object, got {type(msg).__name__}")
        method = msg.get("method")
        if method == "subscription":
            params = msg.get("params")
            if type(params) is not dict:
                raise FeedError(f"{self.name}: params: expected an object, got {params!r:.60}")
            channel, data = params.get("channel"), params.get("data")
            kind = channel.partition(".")[0] if type(channel) is str else None
            if kind == "trades":
                if type(data) is not list:
                    raise FeedError(f"{self.name}: data: expected an array, got {data!r:.60}")
                return Parsed([self._trade(d, recv_us) for d in data])
            if kind == "quote":
                return Parsed([self._quote(data, recv_us)])
            raise FeedError(f"{self.name}: unknown channel {channel!r:.60}")
        if method == "heartbeat":
            params = msg.get("params")
            beat = params.get("type") if type(params) is dict else None
            if beat == "test_request":
                return Parsed(control="heartbeat", detail="test_request", reply=TEST_REPLY)
            return Parsed(control="heartbeat", detail=f"{beat}"[:100])
        rid = msg.get("id")
        if "error" in msg:
            err = msg["error"]
            if type(err) is dict:
                err = f"{err.get('code')}: {err.get('message')} {err.get('data') or ''}".rstrip()
            return Parsed(control="error", detail=f"id={rid} {err}"[:500])
        if "result" in msg and rid is not None:
            result = msg["result"]
            asked = self._asked.get(rid) if type(rid) is int else None
            if asked is not None and type(result) is list:
                missing = [c for c in asked if c not in result]
                if missing:
                    return Parsed(
                        control="error", detail=f"id={rid} not subscribed: {missing}"[:500]
                    )
            return Parsed(control="ack", detail=f"id={rid} {result}"[:500])
        raise FeedError(f"{self.name}: unknown frame, method {method!r:.40}")

    def _trade(self, d: Any, recv_us: int) -> Trade:
        if type(d) is not dict:
            raise FeedError(f"{self.name}: data[]: expected an object, got {d!r:.60}")
        with missing_fields(self.name, "trade"):
            name, side = d["instrument_name"], d["direction"]
            if type(side) is not str or side not in SIDES:
                raise FeedError(f"{self.name}: direction: unknown direction {side!r:.60}")
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": self._symbol(name),
                "venue_symbol": name, "trade_id": d["trade_seq"],
                "price": self._dec(d, "price"), "qty": self._dec(d, "amount"), "side": side,
                "event_us": ms_to_us(self.name, "timestamp", d["timestamp"]),
                "recv_us": recv_us,
            }  # fmt: skip
        return build(self.name, "trade", wire)

    def _quote(self, d: Any, recv_us: int) -> Quote:
        if type(d) is not dict:
            raise FeedError(f"{self.name}: data: expected an object, got {d!r:.60}")
        with missing_fields(self.name, "quote"):
            name = d["instrument_name"]
            wire = {
                "v": 1, "t": "quote", "venue": self.name, "symbol": self._symbol(name),
                "venue_symbol": name, "update_id": None,
                "bid_price": self._dec(d, "best_bid_price"),
                "bid_qty": self._dec(d, "best_bid_amount"),
                "ask_price": self._dec(d, "best_ask_price"),
                "ask_qty": self._dec(d, "best_ask_amount"),
                "event_us": ms_to_us(self.name, "timestamp", d["timestamp"]),
                "recv_us": recv_us,
            }  # fmt: skip
        return build(self.name, "quote", wire)


def _request(rid: int, method: str, params: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


class DeribitRest:
    """Deribit public trade history over JSON-RPC on HTTP GET (``/api/v2/public/...``).

    By sequence (gap repair): ``get_last_trades_by_instrument`` with ``start_seq``,
    ``end_seq``, ``count`` <= 1000, ascending. By time (backfill):
    ``get_last_trades_by_instrument_and_time`` with ``start_timestamp``/``end_timestamp``
    (inclusive milliseconds), ascending, to find where a time range starts.
    """

    def __init__(self, config: VenueConfig | None = None, http: Http | None = None):
        self.venue = Deribit(config)
        self.name = self.venue.config.name
        self.http = http or Http(self.venue.config.rest_url, min_interval_s=REST_INTERVAL_S)

    def historical_trades(
        self, symbol: str, from_id: int | None = None, limit: int = REST_PAGE
    ) -> list[Trade]:
        """Up to ``limit`` trades from sequence ``from_id`` on (the newest without it),
        oldest first."""
        count = min(limit, REST_PAGE)
        if from_id is None:
            rows = self._get("get_last_trades_by_instrument", symbol, count=count, sorting="desc")
            return [self._trade(symbol, r) for r in reversed(rows)]
        rows = self._get(
            "get_last_trades_by_instrument", symbol, start_seq=from_id,
            end_seq=from_id + count - 1, count=count, sorting="asc",
        )  # fmt: skip
        return [self._trade(symbol, r) for r in rows]

    def trades_by_id(
        self,
        symbol: str,
        from_id: int,
        to_id: int | None,
        start_us: int | None = None,
        end_us: int | None = None,
    ) -> Iterator[Trade]:
        """Exactly the trades with sequence in [from_id, to_id] (to the newest without
        ``to_id``), in order, paged by sequence (the time bounds are not needed); a page
        that skips one raises RestError, never a silent hole."""
        return contiguous(
            self.name, symbol, from_id, to_id,
            lambda nxt, n: self.historical_trades(symbol, nxt, n), unit="seq",
            page_size=REST_PAGE,
        )  # fmt: skip

    def trades_by_time(self, symbol: str, start_us: int, end_us: int) -> Iterator[Trade]:
        """Every trade with start_us <= time < end_us, in sequence order: the time query
        finds the first one, then pages go on by sequence, so a millisecond holding more
        trades than a page is never split or repeated."""
        start_ms, last_ms = -(-start_us // 1000), -(-end_us // 1000) - 1
        rows = self._get(
            "get_last_trades_by_instrument_and_time", symbol, start_timestamp=start_ms,
            end_timestamp=last_ms, count=1, sorting="asc",
        )  # fmt: skip
        first = self._trade(symbol, rows[0]).trade_id if rows else None
        page = partial(self.historical_trades, symbol)
        yield from by_id_from(first, page, REST_PAGE, start_us, end_us)

    def _get(self, method: str, symbol: str, **params: Any) -> list[Any]:
        name = self.venue.to_venue_symbol(symbol)
        body = self.http.get_json(f"/api/v2/public/{method}", {"instrument_name": name, **params})
        result = body.get("result") if type(body) is dict else None
        rows = result.get("trades") if type(result) is dict else None
        if type(rows) is not list:
            raise RestError(f"{self.name} {method} {name}: {str(body)[:200]}")
        return rows

    def _trade(self, symbol: str, r: Any) -> Trade:
        with bad_rows(self.name, "rest trade", r):
            wire = {
                "v": 1, "t": "trade", "venue": self.name, "symbol": symbol,
                "venue_symbol": self.venue.to_venue_symbol(symbol), "trade_id": r["trade_seq"],
                "price": self.venue._dec(r, "price"), "qty": self.venue._dec(r, "amount"),
                "side": r["direction"],
                "event_us": ms_to_us(self.name, "timestamp", r["timestamp"]),
                "recv_us": now_us(self.http),
            }  # fmt: skip
        return build(self.name, "rest trade", wire)


SPEC = VenueSpec(
    "deribit", CONFIG, Deribit, DeribitRest, rest_interval_s=REST_INTERVAL_S,
    simulator_ws_path="/deribit", sequential_ids=True,
)  # fmt: skip
