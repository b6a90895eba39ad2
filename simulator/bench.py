"""Measure the message rate one simulator process sustains to local Binance clients.

    python -m simulator.bench --rate 50000 --seconds 10 [--connections 2] [--quotes]

Starts ``python -m simulator`` (bursts off), connects ``--connections`` combined-stream
clients splitting the symbols between them, counts messages after a warm-up, and
reports the received rate next to what the simulator says it generated and sent. A
rate is sustained when no client was dropped as slow and received ~= generated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time

from websockets.asyncio.client import connect

from simulator.process import SimulatorProcess


async def _count(url: str, counts: list[int], slot: int, stop: asyncio.Event) -> str:
    async with connect(url, compression=None, max_queue=None, ping_interval=None) as ws:
        try:
            while not stop.is_set():
                await ws.recv()
                counts[slot] += 1
        except Exception as e:  # a drop ends this client; report how
            return f"{type(e).__name__}: {e}"
    return "ok"


async def _run(
    sim: SimulatorProcess, symbols: list[str], conns: int, quotes: bool, warm: float, secs: float
) -> dict:
    groups = [symbols[i::conns] for i in range(conns)]
    urls = []
    for g in groups:
        streams = []
        for s in g:
            name = s.replace("-", "").lower()
            streams.append(f"{name}@trade")
            if quotes:
                streams.append(f"{name}@bookTicker")
        urls.append(sim.ws_url() + "/stream?streams=" + "/".join(streams))
    counts = [0] * conns
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_count(u, counts, i, stop)) for i, u in enumerate(urls)]
    await asyncio.sleep(warm)
    before = sum(counts)
    r0 = await asyncio.to_thread(sim.report)
    cpu0 = (_cpu(sim.proc.pid), _own_cpu())
    t0 = time.monotonic()
    await asyncio.sleep(secs)
    elapsed = time.monotonic() - t0
    after = sum(counts)
    cpu1 = (_cpu(sim.proc.pid), _own_cpu())
    r1 = await asyncio.to_thread(sim.report)
    stop.set()
    for t in tasks:
        t.cancel()
    ends = await asyncio.gather(*tasks, return_exceptions=True)
    gen0 = sum(m["generated"] for m in r0["markets"].values())
    gen1 = sum(m["generated"] for m in r1["markets"].values())
    b = r1["venues"]["binance"]
    return {
        "received_per_s": round((after - before) / elapsed),
        "generated_trades_per_s": round((gen1 - gen0) / elapsed),
        "frames_sent_per_s": round((b["frames"] - r0["venues"]["binance"]["frames"]) / elapsed),
        "slow_drops": b["slow_drops"],
        "server_cpu": round((cpu1[0] - cpu0[0]) / elapsed, 2),  # cores busy
        "client_cpu": round((cpu1[1] - cpu0[1]) / elapsed, 2),
        "clients": [e if isinstance(e, str) else "running" for e in ends],
    }


def _cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simulator.bench", description=__doc__)
    p.add_argument("--rate", type=float, default=50_000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--symbols", default="BTC-USDT,ETH-USDT,SOL-USDT,BNB-USDT")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--quotes", action="store_true", help="also subscribe to bookTicker")
    p.add_argument("--tick-ms", default="5")
    p.add_argument("--max-queue", default="50000", help="frames queued per connection")
    a = p.parse_args(argv)
    symbols = a.symbols.split(",")
    args = ["--rate", str(a.rate), "--symbols", a.symbols, "--no-bursts", "--tick-ms", a.tick_ms]
    args += ["--max-queue", a.max_queue]
    with SimulatorProcess(*args) as sim:
        result = asyncio.run(_run(sim, symbols, a.connections, a.quotes, a.warmup, a.seconds))
    print(json.dumps({"rate": a.rate, "connections": a.connections, **result}))


if __name__ == "__main__":
    main()
