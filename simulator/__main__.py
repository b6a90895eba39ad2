"""``python -m simulator``: run the exchange simulator until SIGINT/SIGTERM.

Prints one JSON line ``{"ready": true, "port": N, ...}`` on stdout once listening, so a
parent process (``simulator.process``) can use ``--port 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from simulator.faults import FaultSettings
from simulator.server import VENUES, SimConfig, Simulator


def _fault(text: str) -> tuple[str, dict[str, str]]:
    """'binance:gap_every=1000,dup_every=500' -> ('binance', {...})"""
    venue, _, spec = text.partition(":")
    if venue not in VENUES or not spec:
        raise argparse.ArgumentTypeError(f"expected VENUE:KEY=VALUE[,KEY=VALUE], got {text!r}")
    values = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in FaultSettings.names() or not value:
            raise argparse.ArgumentTypeError(
                f"bad fault {part!r}; keys: {', '.join(FaultSettings.names())}"
            )
        values[key] = value
    return venue, values


def _start_ids(text: str) -> dict[str, int]:
    """'BTC-USDT=1000,ETH-USDT=2000' -> {'BTC-USDT': 1000, 'ETH-USDT': 2000}"""
    out = {}
    for part in filter(None, text.split(",")):
        sym, _, value = part.partition("=")
        if not sym or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected SYMBOL=ID, got {part!r}")
        out[sym] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> SimConfig:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__)
    p.add_argument("--symbols", default=",".join(d.symbols), help="canonical, comma separated")
    p.add_argument("--rate", type=float, default=d.rate, help="trades/s over all symbols")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--start-id", type=int, default=d.start_id)
    p.add_argument(
        "--start-ids",
        type=_start_ids,
        default={},
        metavar="SYMBOL=ID[,...]",
        help="per-symbol first trade id (overrides --start-id for those symbols)",
    )
    p.add_argument("--max-history", type=int, default=d.max_history)
    p.add_argument(
        "--history-hours", type=float, default=0.0,
        help="trades of the past this many hours, served by REST from the start",
    )  # fmt: skip
    p.add_argument(
        "--history-rate", type=float, default=d.history_rate,
        help="trades/s over all symbols in that past",
    )  # fmt: skip
    p.add_argument("--tick-ms", type=float, default=d.tick_ms)
    p.add_argument("--volatility", type=float, default=d.volatility)
    p.add_argument("--quote-ratio", type=float, default=d.quote_ratio)
    p.add_argument("--no-bursts", action="store_true")
    p.add_argument(
        "--books",
        action="store_true",
        help="keep every symbol's order book from the start (else from its first request)",
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--ping-interval", type=float, default=d.ping_interval)
    p.add_argument("--ping-timeout", type=float, default=d.ping_timeout)
    p.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s)
    p.add_argument("--weight-limit", type=int, default=d.weight_limit)
    p.add_argument("--throttle", type=int, default=0, help="429 the first K REST requests")
    p.add_argument("--retry-after", type=int, default=d.retry_after_s)
    p.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="VENUE:KEY=VALUE[,...]",
        help="standing fault, e.g. binance:gap_every=1000; keys: "
        + ", ".join(FaultSettings.names()),
    )
    a = p.parse_args(argv)
    faults: dict[str, dict] = {}
    for venue, values in a.fault:
        faults.setdefault(venue, {}).update(values)
    return SimConfig(
        symbols=a.symbols,
        rate=a.rate,
        host=a.host,
        port=a.port,
        seed=a.seed,
        start_id=a.start_id,
        start_ids=a.start_ids,
        max_history=a.max_history,
        tick_ms=a.tick_ms,
        volatility=a.volatility,
        quote_ratio=a.quote_ratio,
        bursts=not a.no_bursts,
        books=a.books,
        max_queue=a.max_queue,
        ping_interval=a.ping_interval,
        ping_timeout=a.ping_timeout,
        shutdown_grace_s=a.shutdown_grace,
        weight_limit=a.weight_limit,
        throttle=a.throttle,
        retry_after_s=a.retry_after,
        faults=faults,
        history_s=a.history_hours * 3600,
        history_rate=a.history_rate,
    )


async def _main(config: SimConfig) -> None:
    sim = Simulator(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sim.request_stop)

    def ready(s: Simulator) -> None:
        line = {
            "ready": True,
            "port": s.port,
            "http": s.http_url,
            "ws": {v: s.ws_url(v) for v in VENUES},
        }
        print(json.dumps(line), flush=True)

    await sim.run(on_ready=ready)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("simulator.ws").setLevel(logging.WARNING)
    try:
        config = parse_args(argv)
    except ValueError as e:
        sys.exit(f"simulator: {e}")
    asyncio.run(_main(config))


if __name__ == "__main__":
    main()
