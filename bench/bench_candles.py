"""How fast one core turns a day of trades into candles (and their indicators).

Synthetic trades: ``--symbols`` symbols (default 10) at one trade per second each for
one day (864,000 trades), with ``Decimal`` prices and sizes as read from PostgreSQL.
Times ``tasks.analytics.candles.compute`` per interval (best of ``--runs``) and the indicators of
the 1 m series, and prints candles per second.

    .venv/bin/python -m bench.bench_candles [--symbols 10] [--per-second 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import random
import time
from decimal import Decimal

import pandas as pd

from tasks.analytics import candles, indicators

DAY_S = 86_400
T0 = 1_700_006_400_000_000  # a midnight, UTC


def synthetic_trades(symbols: int, per_second: int, seed: int = 7) -> pd.DataFrame:
    """A random walk per symbol in cents, sizes in 1e-5 lots: realistic Decimal shapes."""
    rnd = random.Random(seed)
    rows = []
    cents, lots = Decimal("0.01"), Decimal("0.00001")
    for s in range(symbols):
        symbol = f"S{s}-USDT"
        price = 4_300_000 + s * 10_000
        step = 1_000_000 // per_second
        for i in range(DAY_S * per_second):
            price = max(1, price + rnd.randint(-5, 5))
            qty = rnd.randint(1, 200_000)
            rows.append(("bench", symbol, i, price * cents, qty * lots, T0 + i * step))
    return candles.trades_frame(rows)


def best(fn, runs: int) -> tuple[float, object]:
    best_s, out = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        best_s = min(best_s, time.perf_counter() - t0)
    return best_s, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--symbols", type=int, default=10)
    p.add_argument("--per-second", type=int, default=1, help="trades per second per symbol")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    trades = synthetic_trades(a.symbols, a.per_second)
    print(f"{len(trades):,} trades, {a.symbols} symbols, one day "
          f"(built in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    minute = None
    for interval in candles.DEFAULT_INTERVALS:
        secs, out = best(lambda i=interval: candles.compute(trades, i), a.runs)
        minute = out if interval == "1m" else minute
        print(f"{interval:>3}: {len(out):6,} candles in {secs:.3f} s = "
              f"{len(out) / secs:,.0f} candles/s ({len(trades) / secs:,.0f} trades/s)")  # fmt: skip
    spec = indicators.Spec()
    width = candles.interval_us("1m")

    def all_series():
        return sum(
            len(indicators.compute(g, width, spec, int(g.open_us.iloc[0])))
            for _, g in minute.groupby("symbol")
        )

    secs, n = best(all_series, a.runs)
    print(f"indicators on 1m: {n:,} rows in {secs:.3f} s = {n / secs:,.0f} rows/s")


if __name__ == "__main__":
    main()
