"""Indicators on a candle series: SMA, EWMA, percent change, rolling min/max and volume.

Pure computation; ``tasks.analytics.candle_store`` loads the inputs and stores the results.

**Where they live: their own table, ``candle_indicators``** (one row per candle, same key;
migration ``0100_aggregate.sql``). Candles are facts about trades (or venue klines where
we have no trades) and are written by two producers; indicators are derived
from a *series* of candles with chosen parameters, and a late trade in one window
changes the EWMA of every later window. Keeping them apart means that ripple rewrites
only indicator rows, a parameter change never touches a candle, and each row records the
parameters it was computed with (``spec``).

Definitions, on the series of one (venue, symbol, interval):

- **Time grid, gaps explicit.** Windows are points on the interval's regular grid. An
  empty window has no candle (``tasks.analytics.candles``), but it still counts as one window of
  time: for indicators its close is the previous close carried forward, its high and
  low equal that close, its volume is 0. So "SMA 20 on 1 m" is always the last 20
  minutes, never 20 candles spread over an hour of silence. Indicator rows exist only
  for windows that have a candle.
- **Warm-up.** SMA, percent change and the rolling values are NULL until the series
  has enough windows (``sma``, ``change + 1``, ``rolling``). The series starts at its
  first candle.
- **EWMA** with ``alpha = 2 / (span + 1)`` is **seeded with the first close** (the
  series' first candle has EWMA = its close; never zero), then
  ``E_t = E_{t-1} + alpha * (close_t - E_{t-1})``. Across ``k`` empty windows after a
  candle with close ``c`` it decays towards ``c`` in closed form:
  ``E = c + (E_prev - c) * (1 - alpha) ** k``. Each candle's value depends only on the
  previous candle's stored value, so the incremental run and a rebuild of any range give
  the same digits, and a constant series gives exactly that constant.
- **Percent change** over ``change`` windows: ``(close_t - close_{t-n}) * 100 /
  close_{t-n}``. **Rolling min/max**: lowest low / highest high of the last ``rolling``
  windows. **Rolling volume**: their summed volume (exact).

Arithmetic: sums are exact (``tasks.analytics.candles.EXACT``); every division or product with
alpha is rounded once to ``CONTEXT`` (28 significant digits, half-even). Never floats.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from itertools import accumulate
from operator import ge, le

import pandas as pd

from tasks.analytics.candles import EXACT

CONTEXT = Context(prec=28)
COLUMNS = ("open_us", "sma", "ewma", "pct_change", "roll_min", "roll_max", "roll_volume")


@dataclass(frozen=True)
class Spec:
    """Indicator parameters, in windows of the series' interval."""

    sma: int = 20
    ewma_span: int = 20
    change: int = 60
    rolling: int = 60

    def __post_init__(self) -> None:
        for name in ("sma", "ewma_span", "change", "rolling"):
            if getattr(self, name) < 1:
                raise ValueError(f"indicator {name} must be >= 1 window")

    @property
    def lookback(self) -> int:
        """Windows before the first recomputed one that its values depend on."""
        return max(self.sma - 1, self.change, self.rolling - 1)

    @property
    def alpha(self) -> Decimal:
        return CONTEXT.divide(2, self.ewma_span + 1)

    def text(self) -> str:
        """Stored with each row: 'sma=20,ewma=20,change=60,rolling=60'."""
        return f"sma={self.sma},ewma={self.ewma_span},change={self.change},rolling={self.rolling}"


@dataclass(frozen=True)
class Anchor:
    """The newest candle before the first recomputed window, and its stored EWMA."""

    open_us: int
    close: Decimal
    ewma: Decimal


def ewma_next(prev: Anchor | None, open_us: int, close: Decimal, width_us: int, alpha: Decimal):
    """EWMA at a candle, from the previous candle's (``None``: seed with ``close``)."""
    if prev is None:
        return close
    gap = (open_us - prev.open_us) // width_us - 1
    if gap < 0:
        raise ValueError(f"candles out of order: {prev.open_us} then {open_us}")
    carried = prev.ewma
    if gap and carried != prev.close:
        decay = CONTEXT.power(CONTEXT.subtract(1, alpha), gap)
        carried = CONTEXT.add(
            prev.close, CONTEXT.multiply(EXACT.subtract(carried, prev.close), decay)
        )
    return CONTEXT.add(carried, CONTEXT.multiply(alpha, EXACT.subtract(close, carried)))


def compute(
    candles: pd.DataFrame,
    width_us: int,
    spec: Spec,
    emit_from: int,
    prior_close: Decimal | None = None,
    anchor: Anchor | None = None,
) -> pd.DataFrame:
    """Indicator rows (``COLUMNS``) for the candles opening at or after ``emit_from``.

    ``candles``: one series (``open_us``, ``high``, ``low``, ``close``, ``volume``),
    ascending, holding every candle from ``emit_from - spec.lookback * width_us`` on.
    ``prior_close``: close of the newest candle before those (None: the series starts
    inside ``candles``). ``anchor``: the newest candle before ``emit_from`` with its
    stored EWMA (None only when no candle precedes ``emit_from``).
    """
    if candles.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    opens = candles["open_us"].tolist()
    start = opens[0] if prior_close is None else emit_from - spec.lookback * width_us
    if opens[0] < start:
        raise ValueError("candles start before the lookback that prior_close is for")
    if anchor is None and (prior_close is not None or opens[0] < emit_from):
        raise ValueError("a candle precedes emit_from, so its EWMA anchor is needed")
    windows = on_grid(candles, width_us, start, prior_close)
    opens_all, real = windows.index.tolist(), windows["candle"].tolist()
    closes, volume = windows["close"].tolist(), windows["volume"].tolist()
    high, low = windows["high"].tolist(), windows["low"].tolist()
    with localcontext(EXACT):
        close_sum = [Decimal(0), *accumulate(closes)]
        volume_sum = [Decimal(0), *accumulate(volume)]
    roll_min = _sliding(low, spec.rolling, le)
    roll_max = _sliding(high, spec.rolling, ge)
    n_sma, n_chg, n_roll, alpha = spec.sma, spec.change, spec.rolling, spec.alpha
    prev = anchor
    rows = []
    for i in (i for i, t in enumerate(opens_all) if real[i] and t >= emit_from):
        t, c = opens_all[i], closes[i]
        e = ewma_next(prev, t, c, width_us, alpha)
        prev = Anchor(t, c, e)
        base = closes[i - n_chg] if i >= n_chg else None
        rows.append(
            (
                t,
                CONTEXT.divide(EXACT.subtract(close_sum[i + 1], close_sum[i + 1 - n_sma]), n_sma)
                if i + 1 >= n_sma
                else None,
                e,
                pct_change(base, c) if base is not None else None,
                roll_min[i] if i + 1 >= n_roll else None,
                roll_max[i] if i + 1 >= n_roll else None,
                EXACT.subtract(volume_sum[i + 1], volume_sum[i + 1 - n_roll])
                if i + 1 >= n_roll
                else None,
            )
        )
    return pd.DataFrame.from_records(rows, columns=list(COLUMNS))


def on_grid(
    candles: pd.DataFrame, width_us: int, start: int, prior_close: Decimal | None
) -> pd.DataFrame:
    """The series as every window from ``start`` to its last candle, indexed by open
    time: empty windows carry the previous close (``prior_close`` before the first
    candle) as close, high and low, with volume 0; ``candle`` tells which are real."""
    grid = pd.RangeIndex(start, int(candles["open_us"].iloc[-1]) + width_us, width_us)
    frame = candles.set_index("open_us")
    if not frame.index.isin(grid).all():
        raise ValueError(f"candle open times are not on the {width_us} us grid from {start}")
    real = frame["close"].reindex(grid)
    gap = real.isna()
    close = real.ffill()
    if prior_close is not None:
        close = close.fillna(prior_close)
    return pd.DataFrame(
        {
            "close": close,
            "high": frame["high"].reindex(grid).mask(gap, close),
            "low": frame["low"].reindex(grid).mask(gap, close),
            "volume": frame["volume"].reindex(grid).mask(gap, Decimal(0)),
            "candle": ~gap,
        }
    )


def pct_change(base: Decimal, value: Decimal) -> Decimal:
    """(value - base) * 100 / base, rounded once."""
    return CONTEXT.divide(EXACT.multiply(EXACT.subtract(value, base), 100), base)


def _sliding(
    values: Sequence[Decimal], n: int, keep: Callable[[Decimal, Decimal], bool]
) -> list[Decimal]:
    """Min (``keep=le``) or max (``ge``) of each window of ``n`` values ending at i."""
    out: list[Decimal] = []
    window: deque[int] = deque()
    for i, v in enumerate(values):
        while window and keep(v, values[window[-1]]):
            window.pop()
        window.append(i)
        if window[0] <= i - n:
            window.popleft()
        out.append(values[window[0]])
    return out
