"""Trading-activity simulator: realistic user fills on ``user.transactions``.

The platform's second real stream. Each run funds its users with a deposit, then sends
fills at the current market prices (best bid/ask from ``quotes_latest``, or a configured
price when no quote is stored yet): buys at the ask, sells at the bid, a 0.1 % fee in the
quote asset, and a few cancelled or rejected orders, which are stored but move no money.
It tracks each user's balances itself and never sends a fill the user could not pay for,
so wallet balances never go negative. Messages are keyed by user id and acknowledged by
the broker before they are counted.

    python -m flows.trading --users 50 --rate 5 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import defaultdict
from decimal import ROUND_DOWN, Decimal
from typing import Any

import psycopg2
from prefect import flow, get_run_logger

from blocks import settings as block_settings
from flows.common import checked, sigterm_noticed, stop_if_terminated, watch_ending
from tasks.core import codec, config, params
from tasks.core.events import UserTransaction, split_symbol
from tasks.core.kafka import producer
from tasks.core.topics import USER_TRANSACTIONS
from tasks.core.wallets import effects

FALLBACK_PRICES = {"BTC-USDT": "64000", "ETH-USDT": "3200", "SOL-USDT": "150", "BNB-USDT": "580"}
FEE_RATE = Decimal("0.001")
QTY_STEP = Decimal("0.000001")
FEE_STEP = Decimal("0.00000001")
DEPOSIT = Decimal("100000")


def market_prices(settings: config.Settings, fallback: dict[str, str]) -> dict[str, tuple]:
    """``{symbol: (bid, ask)}`` from the newest stored quotes, else the fallback price."""
    prices = {s: (Decimal(p), Decimal(p)) for s, p in fallback.items()}
    try:
        dsn = settings.pg_reader_dsn
        with psycopg2.connect(dsn, connect_timeout=3) as conn, conn.cursor() as cur:
            cur.execute("SELECT symbol, bid_price, ask_price FROM quotes_latest")
            for symbol, bid, ask in cur.fetchall():
                if symbol in prices:
                    prices[symbol] = (bid, ask)
    except psycopg2.Error:
        pass  # no quotes stored yet (or no schema): trade at the configured prices
    return prices


class Book:
    """Each user's balances as the simulator sees them, to send only payable fills."""

    def __init__(self) -> None:
        self.balances: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))

    def apply(self, tx: UserTransaction) -> None:
        for asset, delta in effects(tx):  # the same rules the wallet sink applies
            self.balances[tx.user_id][asset] += delta


def next_fill(
    rng: random.Random, book: Book, user: str, symbol: str, bid: Decimal, ask: Decimal, now_us: int
) -> UserTransaction | None:
    """A fill the user can pay for, or None when they cannot afford either side."""
    base, quote = split_symbol(symbol)
    wallet = book.balances[user]
    side = "buy" if rng.random() < 0.5 else "sell"
    if side == "sell" and wallet[base] <= 0:
        side = "buy"
    price = ask if side == "buy" else bid
    budget = wallet[quote] * Decimal(str(rng.uniform(0.001, 0.02)))
    qty = (budget / price).quantize(QTY_STEP, ROUND_DOWN)
    if side == "sell":
        qty = min(qty, wallet[base]).quantize(QTY_STEP, ROUND_DOWN)
    fee = (qty * price * FEE_RATE).quantize(FEE_STEP)
    if qty <= 0 or (side == "buy" and qty * price + fee > wallet[quote]):
        return None
    roll = rng.random()
    status = "filled" if roll < 0.95 else ("cancelled" if roll < 0.98 else "rejected")
    return UserTransaction(
        tx_id=uuid.uuid4().hex,
        user_id=user,
        symbol=symbol,
        side=side,
        qty=qty,
        price=price,
        fee=fee,
        status=status,
        event_us=now_us,
    )


def _check(
    users: int,
    rate_per_s: float,
    run_seconds: float | None,
    symbols: list[str] | None,
    topic: str,
    **_: Any,
) -> None:
    params.number("users", users, 1, 1_000_000)
    params.number("rate_per_s", rate_per_s, 0.001, 100_000)
    if run_seconds is not None:
        params.number("run_seconds", run_seconds, 0, 366 * 86_400)
    if symbols is not None:
        params.symbols(symbols)
    params.topic("topic", topic, params.NOT_TRANSACTIONS)


@checked(_check)
@flow(name="trading-activity", log_prints=True)
def trading_activity(
    users: int = 50,
    rate_per_s: float = 5.0,
    run_seconds: float | None = None,
    symbols: list[str] | None = None,
    fallback_prices: dict[str, str] | None = None,
    seed: int | None = None,
    topic: str = USER_TRANSACTIONS,
    kafka_block: str | None = None,
    postgres_block: str | None = None,
) -> dict[str, int]:
    """Send deposits, then fills at market prices, until cancelled or ``run_seconds``."""
    logger = get_run_logger()
    terminated = sigterm_noticed()  # a SIGTERM Python swallowed (the loop raises it)
    settings = block_settings(kafka=kafka_block, postgres=postgres_block)
    fallback = fallback_prices or FALLBACK_PRICES
    symbols = symbols or list(fallback)
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    user_ids = [f"user-{i:04d}" for i in range(users)]
    quotes = {split_symbol(s)[1] for s in symbols}
    book = Book()
    p = producer(settings)
    sent: dict[str, int] = defaultdict(int)
    pending = []
    ended = threading.Event()  # set by the server's verdict, or when this run stops

    def send(tx: UserTransaction) -> None:
        pending.append(p.send(topic, key=tx.user_id.encode(), value=codec.encode(tx)))
        book.apply(tx)
        sent[tx.status if tx.side != "deposit" else "deposit"] += 1

    def confirm() -> None:
        for f in pending:
            f.get(timeout=60)  # raises if the broker did not take it: the run fails loudly
        pending.clear()

    try:
        for user in user_ids:
            for asset in sorted(quotes):
                send(
                    UserTransaction(
                        f"{run}-dep-{user}-{asset}",
                        user,
                        asset,
                        "deposit",
                        DEPOSIT,
                        Decimal(1),
                        Decimal(0),
                        "filled",
                        time.time_ns() // 1000,
                    )
                )
        confirm()
        logger.info("funded %d users with %s of %s", users, DEPOSIT, ", ".join(sorted(quotes)))
        start = time.monotonic()
        prices, prices_at = market_prices(settings, fallback), start
        watch_ending(ended)
        n = 0
        while run_seconds is None or time.monotonic() - start < run_seconds:
            stop_if_terminated(terminated)
            if ended.is_set():
                logger.warning("this run was ended by the server: its replacement sends")
                break
            if time.monotonic() - prices_at > 5:
                prices, prices_at = market_prices(settings, fallback), time.monotonic()
            symbol = rng.choice(symbols)
            bid, ask = prices[symbol]
            tx = next_fill(
                rng, book, rng.choice(user_ids), symbol, bid, ask, time.time_ns() // 1000
            )
            if tx is not None:
                send(tx)
                n += 1
            if len(pending) >= 100:
                confirm()
            time.sleep(rng.expovariate(rate_per_s))
            if n and n % 500 == 0:
                logger.info("sent %s", dict(sent))
    finally:
        ended.set()  # the watch thread stops too
        confirm()
        p.close(timeout=30)
    logger.info("done: %s", dict(sent))
    return dict(sent)


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="python -m flows.trading", description=__doc__)
    a.add_argument("--users", type=int, default=50)
    a.add_argument("--rate", type=float, default=5.0, help="fills per second")
    a.add_argument("--seconds", type=float, help="stop after this long")
    a.add_argument("--seed", type=int)
    args = a.parse_args(argv)
    print(
        json.dumps(
            trading_activity(
                users=args.users, rate_per_s=args.rate, run_seconds=args.seconds, seed=args.seed
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
