"""Ingestion's own cost for one Binance trade frame, from its bytes to kafka-python's
``send``: ``ShardWorker.on_frame`` (parse, check, build the Trade, gap tracking, encode,
in-flight bound, ack callback registration), with a producer stand-in whose ``send``
returns a kafka-python ``Future`` and does nothing else. What the library then does is
the same for the raw producer ``bench_ingest`` compares with; this is the part that is
ours.

Timed CPU on this VM swings by half between runs a minute apart (its neighbours share the
host), so ``--instructions`` also counts the instructions a frame takes under valgrind's
callgrind: the same count on any run, the number to judge a change of this path by
(needs ``valgrind``: ``apt-get install valgrind``). Both print; neither aborts.

    .venv/bin/python -m bench.bench_frame [--frames 20000] [--instructions]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time

from kafka.future import Future

from tasks.ingest.live import ShardWorker, plan
from tasks.ingest.publish import Publisher, Topics
from tasks.venues.connection import ConnectionPolicy

WARMUP = 2000  # frames before counting: the interpreter's specialisations settle


class _Producer:
    """Stands in for ``KafkaProducer``: the futures are never resolved."""

    def send(self, topic: str, key: bytes, value: bytes, partition: int) -> Future:
        return Future()

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(6))


def _frames(n: int, first_id: int) -> list[bytes]:
    ms = time.time_ns() // 1_000_000
    return [
        json.dumps({
            "e": "trade", "E": ms, "s": "BTCUSDT", "t": first_id + i, "p": "43210.12000000",
            "q": "0.00123000", "T": ms, "m": bool(i & 1),
        }).encode()
        for i in range(n)
    ]  # fmt: skip


def _worker() -> ShardWorker:
    p = plan("binance", ["BTC-USDT", "ETH-USDT"], ["trades"], simulator_url="http://127.0.0.1:1")
    publisher = Publisher(_Producer(), p.config.name, Topics(), max_in_flight=10**9)  # type: ignore[arg-type]
    return ShardWorker(p, 0, publisher.lane("0"), "bench", ConnectionPolicy(), {})


def _run(frames: int, made: int) -> None:
    """Make ``made`` frames (whatever ``frames`` is, so that making them cancels out of
    the difference callgrind takes), warm up, then put ``frames`` through one worker."""
    worker = _worker()
    batch = _frames(WARMUP + made, 1)
    gc.collect()
    gc.freeze()
    recv_us = time.time_ns() // 1000
    for raw in batch[: WARMUP + frames]:
        worker.on_frame(raw, recv_us)


def timed(frames: int, rounds: int = 5) -> float:
    """Best of ``rounds``: CPU microseconds a frame in this thread."""
    worker, best, next_id = _worker(), float("inf"), 1
    for _ in range(rounds):
        batch = _frames(frames, next_id)
        next_id += frames
        gc.collect()
        gc.freeze()
        recv_us = time.time_ns() // 1000
        t0 = time.thread_time()
        for raw in batch:
            worker.on_frame(raw, recv_us)
        best = min(best, (time.thread_time() - t0) / frames * 1e6)
        gc.unfreeze()
    return best


def instructions(frames: int) -> float | None:
    """Instructions a frame under callgrind: a run of ``frames`` minus a run of none."""
    if shutil.which("valgrind") is None:
        return None

    def count(n: int) -> int:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             sys.executable, "-m", "bench.bench_frame", "--_run", str(n), str(frames)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        m = re.search(r"Collected : (\d+)", out.stderr)
        assert m, out.stderr[-2000:]
        return int(m.group(1))

    return (count(frames) - count(0)) / frames


def main(argv: list[str] | None = None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--frames", type=int, default=20_000)
    a.add_argument("--instructions", action="store_true", help="count them under callgrind")
    a.add_argument("--_run", type=int, nargs=2, help=argparse.SUPPRESS)
    args = a.parse_args(argv)
    if args._run is not None:
        _run(*args._run)
        return
    print(f"on_frame, a Binance trade frame: {timed(args.frames):.1f} us CPU (best of 5)")
    if args.instructions:
        n = instructions(min(args.frames, 5000))
        if n is None:
            print("instructions: valgrind is not installed (apt-get install valgrind)")
        else:
            print(f"on_frame, a Binance trade frame: {n:,.0f} instructions (callgrind)")


if __name__ == "__main__":
    main()
