"""Candles from trades: OHLCV, trade count and VWAP per symbol per window, on event time.

Pure computation (pandas, no I/O), so the scheduled aggregate, a range rebuild, the
tests and the benchmark all compute the same numbers the same way.

Rules, written down because readers of the numbers depend on them:

- **Event time.** A trade belongs to the window ``[open_us, open_us + width)`` that holds
  its ``event_us``; windows are aligned to the epoch (a 5 m window opens at :00, :05, ...).
  Arrival order is irrelevant: open and close are the first and last trade by
  ``(event_us, trade_id)``, so a late trade lands where it happened.
- **Exact decimals.** ``price`` and ``qty`` stay Python ``Decimal`` objects in object
  columns; pandas sorts the trades and numpy reduces each window's contiguous run of
  rows with Decimal's own comparisons, ``+`` and ``*`` (never converting to floats).
  Sums and products run in ``EXACT`` (a context with maximal precision), so volume and
  quote volume are exact.
  VWAP = quote volume / volume is a division, rounded once to ``VWAP_CONTEXT`` (28
  significant digits, half-even); rounding is monotone, so VWAP stays within [low, high].
- **Empty windows produce no candle.** A window without trades has no open or close to
  report; inventing one (the previous close, zero volume) would be indistinguishable
  from a real flat window. Indicators (``tasks.analytics.indicators``) treat such gaps explicitly.
- **Finality.** A window is final once ``open_us + width + grace <= now``
  (``last_final_open``); the aggregate flow computes only final windows, and recomputes a
  final window again whenever a late, repaired or backfilled trade lands in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, localcontext

import numpy as np
import pandas as pd

from tasks.core.events import Candle, Trade

MINUTE_US = 60_000_000
DEFAULT_INTERVALS: tuple[str, ...] = ("1m", "5m", "1h")
EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)  # + and * never round
VWAP_CONTEXT = Context(prec=28)
_UNITS_US = {"m": MINUTE_US, "h": 60 * MINUTE_US, "d": 1440 * MINUTE_US}
_INTERVAL = re.compile(r"([1-9][0-9]{0,4})([mhd])")
TRADE_COLUMNS = ("venue", "symbol", "trade_id", "price", "qty", "event_us")
CANDLE_COLUMNS = (
    "venue", "symbol", "interval", "open_us", "open", "high", "low", "close", "volume",
    "trade_count", "vwap", "source",
)  # fmt: skip


def interval_us(interval: str) -> int:
    """'1m' -> 60_000_000. Whole minutes, hours or days only (e.g. '15m', '4h', '1d'), so
    every window is a union of whole minutes (what the dirty-window tracking records)."""
    m = _INTERVAL.fullmatch(interval)
    if m is None:
        raise ValueError(f"bad interval {interval!r}: expected <n>m, <n>h or <n>d, e.g. 1m, 5m, 1h")
    return int(m.group(1)) * _UNITS_US[m.group(2)]


def window_open(event_us: int, width_us: int) -> int:
    """Open time of the window holding ``event_us``."""
    return event_us - event_us % width_us


def last_final_open(now_us: int, width_us: int, grace_us: int) -> int:
    """Open time of the newest final window at ``now_us``: a window is final once
    ``open_us + width + grace <= now``."""
    return window_open(now_us - grace_us - width_us, width_us)


def trades_frame(rows: Iterable[Trade] | Iterable[tuple]) -> pd.DataFrame:
    """A trades frame from ``Trade`` events or from row tuples in ``TRADE_COLUMNS`` order."""
    data = [
        (r.venue, r.symbol, r.trade_id, r.price, r.qty, r.event_us) if isinstance(r, Trade) else r
        for r in rows
    ]
    frame = pd.DataFrame.from_records(data, columns=list(TRADE_COLUMNS))
    return frame.astype(
        {
            "venue": object,
            "symbol": object,
            "trade_id": "int64",
            "price": object,
            "qty": object,
            "event_us": "int64",
        }
    )


def compute(trades: pd.DataFrame, interval: str) -> pd.DataFrame:
    """One row per (venue, symbol, window) that holds trades, in ``CANDLE_COLUMNS``,
    ordered by venue, symbol and open time. ``trades`` holds unique trades (the trades
    table's primary key guarantees it) with ``price``/``qty`` as ``Decimal``."""
    if trades.empty:
        return pd.DataFrame(columns=list(CANDLE_COLUMNS))
    width = interval_us(interval)
    t = trades.sort_values(["venue", "symbol", "event_us", "trade_id"], kind="stable")
    venue, symbol = t["venue"].to_numpy(), t["symbol"].to_numpy()
    event = t["event_us"].to_numpy()
    opens = event - event % width
    # sorted, so each (venue, symbol, window) is one contiguous run of rows
    starts = np.flatnonzero(
        np.concatenate(
            (
                [True],
                (venue[1:] != venue[:-1]) | (symbol[1:] != symbol[:-1]) | (opens[1:] != opens[:-1]),
            )
        )
    )
    ends = np.append(starts[1:], len(t))
    price, qty = t["price"].to_numpy(), t["qty"].to_numpy()
    with localcontext(EXACT):  # object reductions call Decimal's own + and *
        out = pd.DataFrame(
            {
                "venue": venue[starts],
                "symbol": symbol[starts],
                "open_us": opens[starts],
                "open": price[starts],
                "high": np.maximum.reduceat(price, starts),
                "low": np.minimum.reduceat(price, starts),
                "close": price[ends - 1],
                "volume": np.add.reduceat(qty, starts),
                "trade_count": ends - starts,
                "notional": np.add.reduceat(price * qty, starts),
            }
        )
    out["vwap"] = list(map(vwap, out["notional"], out["volume"]))
    out["interval"] = interval
    out["source"] = "trades"
    return out[list(CANDLE_COLUMNS)]


def to_candles(frame: pd.DataFrame) -> list[Candle]:
    """The rows of a ``compute`` result as ``Candle`` events."""
    return [
        Candle(
            venue=r.venue,
            symbol=r.symbol,
            interval=r.interval,
            open_us=int(r.open_us),
            open=r.open,
            high=r.high,
            low=r.low,
            close=r.close,
            volume=r.volume,
            trade_count=int(r.trade_count),
            vwap=r.vwap,
            source=r.source,
        )
        for r in frame.itertuples(index=False)
    ]


def candles(trades: Iterable[Trade], interval: str) -> list[Candle]:
    """``compute`` for a list of trades, as events (tests and small callers)."""
    return to_candles(compute(trades_frame(trades), interval))


def vwap(notional: Decimal, volume: Decimal) -> Decimal:
    """Quote volume / volume, rounded once (``VWAP_CONTEXT``)."""
    return VWAP_CONTEXT.divide(notional, volume)
