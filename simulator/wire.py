"""Number and time formatting shared by the venue modules.

The market keeps prices and sizes as integers in units of ``10**-dp`` so the hot path
never builds a ``Decimal``; these helpers turn them into the exact decimal text the
venues put on the wire.
"""

from __future__ import annotations

import time
from decimal import ROUND_HALF_EVEN, Decimal


def fmt_units(value: int, dp: int) -> str:
    """12345, 2 -> '123.45'; exact, no float on the way."""
    if dp == 0:
        return str(value)
    sign = "-" if value < 0 else ""
    digits = str(abs(value)).rjust(dp + 1, "0")
    return f"{sign}{digits[:-dp]}.{digits[-dp:]}"


def fmt_rounded(value: int, dp: int, out_dp: int) -> str:
    """``value * 10**-dp`` printed with exactly ``out_dp`` decimals (half-even if it must round)."""
    if dp <= out_dp:
        return fmt_units(value * 10 ** (out_dp - dp), out_dp)
    exact = Decimal(value).scaleb(-dp)
    return str(exact.quantize(Decimal(1).scaleb(-out_dp), rounding=ROUND_HALF_EVEN))


def decimals_of(step: Decimal) -> int:
    """Decimal places needed to write multiples of ``step`` exactly (0.01 -> 2, 5 -> 0)."""
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


_second_cache: dict[int, str] = {}


def rfc3339_ms(ms: int) -> str:
    """Epoch ms -> '2024-01-02T03:04:05.678000Z' (microsecond field, as Coinbase/Kraken print)."""
    sec, rem = divmod(ms, 1000)
    prefix = _second_cache.get(sec)
    if prefix is None:
        if len(_second_cache) > 4096:
            _second_cache.clear()
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second_cache[sec] = prefix
    return f"{prefix}.{rem:03d}000Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000
