"""Order-book sync speed per venue protocol: deltas per second per core, one run.

For each of Binance (``depthUpdate``), Kraken v2 (``book`` with its CRC32 checksum) and
Coinbase (``level2``), a seeded random book (200 levels a side, 1-5 levels changing per
update, mostly near the touch) is written as the venue's own frames, then timed in CPU
seconds of this process along ingestion's path for book frames:

- parse: the venue adapter's ``parse`` (JSON with exact decimals, every level checked);
- parse + sync + publish: the same, then the shard's ``BookKeeper`` (the venue's sync
  machine, checksum included, and the top-``depth`` view diff that becomes the published
  event), then the codec's ``encode`` of each event, as the publisher would send it.

No services are needed. Prints a table; never aborts because the machine is slow.

    .venv/bin/python -m bench.bench_book_sync [--frames 30000] [--depth 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from decimal import Decimal

from tasks.books.book import Book
from tasks.books.keeper import BookKeeper, diff, keep_levels
from tasks.books.sync import kraken_checksum
from tasks.core.codec import encode
from tasks.venues.binance import Binance
from tasks.venues.coinbase import Coinbase
from tasks.venues.kraken import Kraken

T0_MS = 1_764_000_000_000


class Truth:
    """The venue's book: price ticks of 0.01 around 100, quantities of 8 decimals."""

    def __init__(self, seed: int, levels: int = 200):
        self.rnd = random.Random(seed)
        self.book = Book(100_000)
        self.book.replace(
            [(self.price(9999 - i), self.qty()) for i in range(levels)],
            [(self.price(10000 + i), self.qty()) for i in range(levels)],
        )

    def price(self, ticks: int) -> Decimal:
        return Decimal(ticks).scaleb(-2)

    def qty(self) -> Decimal:
        return Decimal(self.rnd.randint(1, 10**9)).scaleb(-8)

    def change(self) -> tuple[list, list]:
        """1-5 levels set or removed; bids stay below 100, asks at or above."""
        bids: dict[Decimal, Decimal] = {}
        asks: dict[Decimal, Decimal] = {}
        for _ in range(self.rnd.randint(1, 5)):
            ticks = int(self.rnd.expovariate(0.1))
            qty = Decimal(0) if self.rnd.random() < 0.3 else self.qty()
            if self.rnd.random() < 0.5:
                bids[self.price(9999 - ticks)] = qty
            else:
                asks[self.price(10000 + ticks)] = qty
        self.book.apply(bids.items(), asks.items())
        return list(bids.items()), list(asks.items())


def _pairs(levels: list) -> list[list[str]]:
    return [[str(p), str(q)] for p, q in levels]


def binance_frames(n: int, seed: int) -> tuple[list[str], object]:
    truth = Truth(seed)
    snapshot_bids, snapshot_asks = truth.book.top(1000)
    frames = []
    for i in range(1, n + 1):
        bids, asks = truth.change()
        data = {
            "e": "depthUpdate", "E": T0_MS + i, "s": "BTCUSDT", "U": i, "u": i,
            "b": _pairs(bids), "a": _pairs(asks),
        }  # fmt: skip
        frames.append(json.dumps({"stream": "btcusdt@depth@100ms", "data": data}))
    snapshot = {"lastUpdateId": 0, "bids": _pairs(snapshot_bids), "asks": _pairs(snapshot_asks)}
    return frames, snapshot


def kraken_frames(n: int, seed: int, depth: int) -> tuple[list[str], str]:
    """Kraken sends the changes of the top-``depth`` view (a level entering scope
    included) and the checksum of the book truncated to ``depth``."""
    truth = Truth(seed)
    view = Book(depth)

    def levels(side: list) -> list[dict]:
        return [{"price": p, "qty": q} for p, q in side]

    def text(obj: dict) -> str:  # decimals as JSON numbers, the way Kraken writes them
        return json.dumps(obj, default=lambda d: f"@{d}@").replace('"@', "").replace('@"', "")

    view.replace(*truth.book.top(depth))
    bids, asks = view.top(depth)
    snap = {"symbol": "BTC/USD", "bids": levels(bids), "asks": levels(asks),
            "checksum": kraken_checksum(view)}  # fmt: skip
    snapshot = text({"channel": "book", "type": "snapshot", "data": [snap]})
    frames = []
    for i in range(n):
        truth.change()
        new_bids, new_asks = truth.book.top(depth)
        d_bids = diff(dict(view.bids()), new_bids)
        d_asks = diff(dict(view.asks()), new_asks)
        view.replace(new_bids, new_asks)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0_MS // 1000 + i // 1000))
        data = {
            "symbol": "BTC/USD", "bids": levels(d_bids), "asks": levels(d_asks),
            "checksum": kraken_checksum(view), "timestamp": f"{stamp}.{i % 1000:03d}000Z",
        }  # fmt: skip
        frames.append(text({"channel": "book", "type": "update", "data": [data]}))
    return frames, snapshot


def coinbase_frames(n: int, seed: int) -> list[str]:
    truth = Truth(seed)

    def updates(bids: list, asks: list, stamp: str) -> list[dict]:
        return [
            {"side": side, "event_time": stamp, "price_level": str(p), "new_quantity": str(q)}
            for side, levels in (("bid", bids), ("offer", asks))
            for p, q in levels
        ]

    def frame(seq: int, kind: str, ups: list[dict], stamp: str) -> str:
        event = {"type": kind, "product_id": "BTC-USD", "updates": ups}
        return json.dumps({"channel": "l2_data", "client_id": "", "timestamp": stamp,
                           "sequence_num": seq, "events": [event]})  # fmt: skip

    bids, asks = truth.book.top(1000)
    frames = [frame(0, "snapshot", updates(bids, asks, "2025-11-24T16:00:00Z"), "x")]
    for i in range(1, n + 1):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(T0_MS // 1000 + i // 1000))
        stamp += f".{i % 1000:03d}000Z"
        frames.append(frame(i, "update", updates(*truth.change(), stamp), stamp))
    return frames


def cpu(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.process_time()
    events = fn()
    return time.process_time() - start, events


def run(frames: int, depth: int, seed: int) -> list[tuple[str, float, float, int]]:
    rows = []
    recv_us = T0_MS * 1000

    # Binance: buffer the first delta, the REST snapshot, then the stream
    b_frames, b_snapshot = binance_frames(frames, seed)
    adapter = Binance()

    def b_parse() -> int:
        return sum(len(adapter.parse(f, recv_us).books) for f in b_frames)

    def b_all() -> int:
        keeper = BookKeeper("binance", "binance", ["BTC-USDT"], depth,
                            keep=keep_levels("binance", depth))  # fmt: skip
        out = 0
        for i, f in enumerate(b_frames):
            for e in keeper.on_frame(adapter.parse(f, recv_us).books, None, recv_us):
                encode(e)
                out += 1
            if i == 0:
                keeper.due_fetches()
                keeper.on_rest_snapshot(adapter.depth_snapshot("BTC-USDT", b_snapshot), recv_us)
        return out

    rows.append(("binance", cpu(b_parse)[0], *cpu(b_all)))

    k_frames, k_snapshot = kraken_frames(frames, seed, depth)
    kraken = Kraken()

    def k_parse() -> int:
        return sum(len(kraken.parse(f, recv_us).books) for f in k_frames)

    def k_all() -> int:
        keeper = BookKeeper("kraken", "kraken", ["BTC-USD"], depth,
                            keep=keep_levels("kraken", depth, kraken.book_depth))  # fmt: skip
        keeper.on_frame(kraken.parse(k_snapshot, recv_us).books, None, recv_us)
        out = 0
        for f in k_frames:
            for e in keeper.on_frame(kraken.parse(f, recv_us).books, None, recv_us):
                encode(e)
                out += 1
        assert not keeper.resyncs, keeper.resyncs  # every checksum matched
        return out

    rows.append(("kraken", cpu(k_parse)[0], *cpu(k_all)))

    c_frames = coinbase_frames(frames, seed)
    coinbase = Coinbase()

    def c_parse() -> int:
        return sum(len(coinbase.parse(f, recv_us).books) for f in c_frames[1:])

    def c_all() -> int:
        keeper = BookKeeper("coinbase", "coinbase", ["BTC-USD"], depth,
                            keep=keep_levels("coinbase", depth))  # fmt: skip
        out = 0
        for f in c_frames:
            parsed = coinbase.parse(f, recv_us)
            for e in keeper.on_frame(parsed.books, parsed.sequence, recv_us):
                encode(e)
                out += 1
        return out

    rows.append(("coinbase", cpu(c_parse)[0], *cpu(c_all)))
    return rows


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--frames", type=int, default=30_000, help="book updates per venue")
    a.add_argument("--depth", type=int, default=10, help="levels a side published")
    a.add_argument("--seed", type=int, default=1)
    args = a.parse_args(argv)
    print(f"{args.frames} book updates per venue, published depth {args.depth}, CPU seconds")
    print(f"{'venue':10} {'parse/s/core':>13} {'all/s/core':>11} {'us/update':>10} "
          f"{'events out':>11}")  # fmt: skip
    for venue, parse_s, all_s, events in run(args.frames, args.depth, args.seed):
        print(
            f"{venue:10} {args.frames / max(parse_s, 1e-9):13,.0f} "
            f"{args.frames / max(all_s, 1e-9):11,.0f} {all_s / args.frames * 1e6:10.1f} "
            f"{events:11,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
