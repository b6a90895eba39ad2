"""How fast one core turns Binance trade frames into validated, encoded Kafka values.

Measures the ingest hot path, ``Binance.parse`` (JSON decode, mapping, validation) then
``codec.encode``, against ``json.loads`` + ``json.dumps`` of the same frames in the same
run, so the ratio is meaningful on any machine. Best of N runs.

    .venv/bin/python -m bench.bench_codec [--frames 200000] [--runs 3]   # from the repo root
"""

from __future__ import annotations

import argparse
import json
import time

from tasks.core.codec import encode
from tasks.venues.binance import Binance

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBFDUSD", "ETHBTC")


def frames(n: int) -> list[str]:
    """Realistic combined-stream trade frames: varying ids, prices, sizes and sides."""
    now_ms = time.time_ns() // 1_000_000 - 60_000
    out = []
    for i in range(n):
        s = SYMBOLS[i % len(SYMBOLS)]
        data = {
            "e": "trade", "E": now_ms + i // 100, "s": s, "t": 4_100_000_000 + i,
            "p": f"{60000 + (i * 7919) % 5000}.{i % 100:02d}000000",
            "q": f"0.{(i * 104729) % 99999999 + 1:08d}", "T": now_ms + i // 100,
            "m": i % 3 == 0, "M": True,
        }  # fmt: skip
        out.append(json.dumps({"stream": f"{s.lower()}@trade", "data": data}))
    return out


def best_rate(fn, items: list[str], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(items)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def tapeline(items: list[str]) -> None:
    parse = Binance().parse
    recv_us = time.time_ns() // 1000
    for raw in items:
        for event in parse(raw, recv_us).events:
            encode(event)


def plain_json(items: list[str]) -> None:
    loads, dumps = json.loads, json.dumps
    for raw in items:
        dumps(loads(raw)).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    items = frames(args.frames)
    ours = best_rate(tapeline, items, args.runs)
    base = best_rate(plain_json, items, args.runs)
    print(f"frames: {args.frames}, best of {args.runs}, one core")
    print(f"binance parse+validate+encode: {ours:>10,.0f} events/s")
    print(f"json.loads+json.dumps:         {base:>10,.0f} frames/s")
    print(f"ratio: {base / ours:.2f}x the cost of plain JSON round-trip")


if __name__ == "__main__":
    main()
