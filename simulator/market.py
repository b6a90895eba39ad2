"""A synthetic, deterministic market per symbol: the one truth every venue format shows.

Why this shape: the pipeline's correctness tests need a stream whose every trade can be
fetched again from REST (gap repair) and whose content does not depend on timing. So
the *content* of the trade sequence (ids, prices, sizes, sides, book updates) comes from
one seeded RNG per symbol and only the *arrival times* come from a second RNG and the
wall clock: the same seed gives the same trades at any rate or machine speed.

Prices and sizes are integers in units of ``10**-dp`` (tick and lot decimals), kept in
compact ``array`` columns so millions of trades per symbol fit in memory for REST.
Every trade executes at the touch (a taker buy at the ask, a taker sell at the bid), so
each trade price lies inside the best bid/ask last published before it.
"""

from __future__ import annotations

import math
import random
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from decimal import Decimal
from itertools import compress
from operator import mul
from statistics import NormalDist
from typing import TYPE_CHECKING, NamedTuple

from simulator.wire import decimals_of

if TYPE_CHECKING:
    from simulator.book import OrderBook


@dataclass(frozen=True, slots=True)
class Instrument:
    symbol: str  # canonical, e.g. BTC-USDT
    start_price: Decimal
    tick: Decimal  # price step
    lot: Decimal  # size step


# Plausible levels and venue-like steps for the usual pairs; anything else gets defaults.
_KNOWN: dict[str, tuple[str, str, str]] = {
    "BTC": ("43000", "0.01", "0.00001"),
    "ETH": ("2300", "0.01", "0.0001"),
    "SOL": ("100", "0.01", "0.001"),
    "BNB": ("300", "0.01", "0.001"),
    "XRP": ("0.6", "0.0001", "1"),
    "DOGE": ("0.08", "0.00001", "1"),
}


def instrument(symbol: str) -> Instrument:
    base, _, quote = symbol.partition("-")
    if not base or not quote:
        raise ValueError(f"not a canonical symbol: {symbol!r}")
    price, tick, lot = _KNOWN.get(base, ("100", "0.01", "0.001"))
    return Instrument(symbol, Decimal(price), Decimal(tick), Decimal(lot))


_TABLE_SIZE = 4096
_Z = [NormalDist().inv_cdf((i + 0.5) / _TABLE_SIZE) for i in range(_TABLE_SIZE)]


class TradeRow(NamedTuple):
    id: int
    price: int  # units of 10**-price_dp
    qty: int  # units of 10**-qty_dp
    ts_ms: int
    buyer_maker: bool  # True when the taker sold


class QuoteRow(NamedTuple):
    update_id: int
    bid: int
    bid_qty: int
    ask: int
    ask_qty: int
    ts_ms: int
    after_id: int  # the book as it stands after this trade id (internal, not on the wire)


@dataclass(frozen=True, slots=True)
class MarketParams:
    rate: float  # mean trades per second for this symbol (before bursts)
    seed: int = 1
    start_id: int = 1_000_000
    max_history: int = 2_000_000
    volatility: float = 0.0001  # relative mid stdev per sqrt(second) (~56% a year)
    quote_ratio: float = 0.2  # chance per trade of a size-only book update
    burst_rate: float = 0.05  # bursts started per second
    burst_factor: float = 4.0  # arrival rate multiplier during a burst
    burst_s: float = 0.5
    max_spread_ticks: int = 3


class Market:
    """One symbol's order flow and its full (bounded) trade history."""

    def __init__(self, inst: Instrument, params: MarketParams, start_ms: int):
        self.inst = inst
        self.symbol = inst.symbol
        self.params = params
        self.price_dp = decimals_of(inst.tick)
        self.qty_dp = decimals_of(inst.lot)
        self.tick = int(inst.tick.scaleb(self.price_dp))
        self.lot = int(inst.lot.scaleb(self.qty_dp))
        self._path = random.Random(f"{params.seed}:{inst.symbol}:path")
        self._arrivals = random.Random(f"{params.seed}:{inst.symbol}:arrivals")
        mid = int(inst.start_price.scaleb(self.price_dp)) // self.tick * self.tick
        self.bid = max(self.tick, mid)
        self.ask = self.bid + self.tick
        # Random sizes and steps are drawn by inverse CDF from fixed quantile tables: one
        # uniform draw each, several times cheaper than random.gauss/lognormvariate.
        notional = Decimal(500)  # a typical print of ~500 quote units
        mu = math.log(max(1.0, float(notional / inst.start_price / inst.lot)))
        self._trade_lots = [max(1, int(math.exp(mu + 1.1 * z))) * self.lot for z in _Z]
        self._level_lots = [max(1, int(math.exp(mu + 1.5 + z))) * self.lot for z in _Z]
        # per-trade mid stdev in ticks, so that ``volatility`` holds per second at the base
        # rate; fixed at start so the path does not depend on how trades are batched
        sigma = (mid / self.tick) * params.volatility / math.sqrt(max(params.rate, 1e-9))
        self._steps = [sigma * z for z in _Z]
        self._drift = 0.0
        self.bid_qty = self._level_lots[int(self._path.random() * _TABLE_SIZE)]
        self.ask_qty = self._level_lots[int(self._path.random() * _TABLE_SIZE)]
        self.update_id = params.start_id * 10
        self.next_id = params.start_id
        self.first_id = params.start_id  # first id generated since start
        self.generated = 0
        self.last_ms = start_ms
        # session statistics for the venues' ticker channels
        self.open_price = 0
        self.last_price = 0
        self.high = 0
        self.low = 0
        self.volume = 0  # qty units
        self.quote_volume = 0  # units of 10**-(price_dp + qty_dp)
        self._burst_until = 0.0
        self._clock = 0.0  # seconds of market time advanced
        # history columns; index i holds trade id history_first_id + i
        self.history_first_id = params.start_id
        self._px = array("q")
        self._qty = array("q")
        self._ts = array("q")
        self._taker_buy = bytearray()
        self._trim_chunk = max(1000, params.max_history // 10)
        self.book: OrderBook | None = None  # L2 book, made on first demand (simulator.book)

    # ---- generation -------------------------------------------------------------------

    def advance(self, dt_s: float, now_ms: int) -> tuple[list[TradeRow], list[QuoteRow]]:
        """Generate the trades that arrive in the next ``dt_s`` seconds (Poisson, with bursts)."""
        p = self.params
        self._clock += dt_s
        rnd = self._arrivals.random
        if p.burst_rate > 0 and rnd() < p.burst_rate * dt_s:
            self._burst_until = self._clock + p.burst_s
        lam = p.rate * dt_s * (p.burst_factor if self._clock < self._burst_until else 1.0)
        return self.generate(_poisson(rnd, lam), now_ms)

    def generate(self, n: int, now_ms: int) -> tuple[list[TradeRow], list[QuoteRow]]:
        """The next ``n`` trades, stamped evenly over (last_ms, now_ms], and the book updates
        they cause. The content depends only on the seed and the trade count so far."""
        if n <= 0:
            return [], []
        r = self._path.random
        tick = self.tick
        steps, trade_lots, level_lots = self._steps, self._trade_lots, self._level_lots
        size = _TABLE_SIZE
        quote_ratio = self.params.quote_ratio
        max_spread = self.params.max_spread_ticks * tick
        bid, ask, bid_qty, ask_qty = self.bid, self.ask, self.bid_qty, self.ask_qty
        drift, update_id = self._drift, self.update_id
        start = self.last_ms
        span = max(0, now_ms - start)
        trades: list[TradeRow] = []
        quotes: list[QuoteRow] = []
        px_col, qty_col, ts_col, buy_col = self._px, self._qty, self._ts, self._taker_buy
        tid = self.next_id
        for i in range(1, n + 1):
            ts = start + span * i // n
            buy = r() < 0.5
            qty = trade_lots[int(r() * size)]
            moved = False
            if buy:
                price = ask
                ask_qty -= qty
                if ask_qty <= 0:
                    ask += tick
                    ask_qty = level_lots[int(r() * size)]
                    moved = True
            else:
                price = bid
                bid_qty -= qty
                if bid_qty <= 0:
                    if bid > tick:
                        bid -= tick
                    bid_qty = level_lots[int(r() * size)]
                    moved = True
            drift += steps[int(r() * size)]
            if drift >= 1.0 or drift <= -1.0:
                step = int(drift)
                drift -= step
                step = max(step, 1 - bid // tick)  # keep the bid at least one tick
                bid += step * tick
                ask += step * tick
                moved = True
            if ask - bid > max_spread:
                if buy:
                    bid = ask - tick
                else:
                    ask = bid + tick
                moved = True
            trades.append(TradeRow(tid, price, qty, ts, not buy))
            px_col.append(price)
            qty_col.append(qty)
            ts_col.append(ts)
            buy_col.append(buy)
            tid += 1
            if moved or r() < quote_ratio:
                if not moved:
                    bid_qty = level_lots[int(r() * size)]
                update_id += 1 + int(r() * 4)
                quotes.append(QuoteRow(update_id, bid, bid_qty, ask, ask_qty, ts, tid - 1))
        self.bid, self.ask, self.bid_qty, self.ask_qty = bid, ask, bid_qty, ask_qty
        self._drift, self.update_id = drift, update_id
        self.next_id = tid
        self.generated += n
        px, qty = px_col[-n:], qty_col[-n:]
        if not self.open_price:
            self.open_price = self.low = px[0]
        self.last_price = px[-1]
        self.high = max(self.high, max(px))
        self.low = min(self.low, min(px))
        self.volume += sum(qty)
        self.quote_volume += sum(map(mul, px, qty))
        self.last_ms = max(start, now_ms)
        if len(px_col) > self.params.max_history + self._trim_chunk:
            self._trim(len(px_col) - self.params.max_history)
        return trades, quotes

    def _trim(self, k: int) -> None:
        del self._px[:k]
        del self._qty[:k]
        del self._ts[:k]
        del self._taker_buy[:k]
        self.history_first_id += k

    # ---- history ----------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """Id of the newest trade (first_id - 1 when none yet)."""
        return self.next_id - 1

    def quote(self, ts_ms: int) -> QuoteRow:
        return QuoteRow(
            self.update_id, self.bid, self.bid_qty, self.ask, self.ask_qty, ts_ms, self.last_id
        )

    def _row(self, i: int) -> TradeRow:
        return TradeRow(
            self.history_first_id + i,
            self._px[i],
            self._qty[i],
            self._ts[i],
            not self._taker_buy[i],
        )

    def rows(self, lo: int, hi: int) -> list[TradeRow]:
        """Rows by history index [lo, hi)."""
        return [self._row(i) for i in range(max(0, lo), min(hi, len(self._px)))]

    def from_id(self, trade_id: int, limit: int) -> list[TradeRow]:
        """Up to ``limit`` trades with id >= trade_id (from the oldest kept, if older)."""
        lo = max(0, trade_id - self.history_first_id)
        return self.rows(lo, lo + limit)

    def recent(self, limit: int) -> list[TradeRow]:
        n = len(self._px)
        return self.rows(n - limit, n)

    def index_at(self, ts_ms: int) -> int:
        """History index of the first trade at or after ``ts_ms``."""
        return bisect_left(self._ts, ts_ms)

    def __len__(self) -> int:
        return len(self._px)

    def bars(self, interval_ms: int, start_ms: int, end_ms: int, limit: int) -> list[Bar]:
        """OHLCV bars in ``interval_ms`` buckets opening in [start_ms, end_ms], oldest
        first; only buckets that hold trades (as Binance: filtered by open time)."""
        ts = self._ts
        if not ts:
            return []
        t = -(-start_ms // interval_ms) * interval_ms
        out: list[Bar] = []
        i = self.index_at(t)
        n = len(ts)
        while len(out) < limit and i < n and t <= end_ms:
            bucket = ts[i] // interval_ms * interval_ms
            if bucket > end_ms:
                break
            j = bisect_left(ts, bucket + interval_ms, i)
            px, qty, buys = self._px[i:j], self._qty[i:j], self._taker_buy[i:j]
            out.append(
                Bar(
                    open_ms=bucket,
                    open=px[0],
                    high=max(px),
                    low=min(px),
                    close=px[-1],
                    volume=sum(qty),
                    quote_volume=sum(map(mul, px, qty)),
                    count=j - i,
                    taker_buy_volume=sum(compress(qty, buys)),
                    taker_buy_quote=sum(map(mul, compress(px, buys), compress(qty, buys))),
                    first_id=self.history_first_id + i,
                    last_id=self.history_first_id + j - 1,
                )
            )
            i = j
            t = bucket + interval_ms
        return out


class Bar(NamedTuple):
    open_ms: int
    open: int
    high: int
    low: int
    close: int
    volume: int  # qty units
    quote_volume: int  # units of 10**-(price_dp + qty_dp)
    count: int
    taker_buy_volume: int
    taker_buy_quote: int
    first_id: int
    last_id: int


def _poisson(rnd, lam: float) -> int:
    """A Poisson draw: Knuth's product method for small means, normal approximation above."""
    if lam <= 0:
        return 0
    if lam < 30:
        limit = math.exp(-lam)
        k, prod = 0, rnd()
        while prod > limit:
            k += 1
            prod *= rnd()
        return k
    # Box-Muller from the same uniform source keeps the draw sequence reproducible
    u1, u2 = rnd() or 1e-12, rnd()
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return max(0, round(lam + z * math.sqrt(lam)))
