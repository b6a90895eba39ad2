"""Wallet arithmetic: what a user transaction does to balances, exactly.

One definition of a transaction's effects serves the MongoDB sink (which folds them into
wallets), the trading simulator (which only sends payable orders) and the checks that
recompute balances from stored transactions. Arithmetic is exact or refused: an amount
that would round raises ``CodecError`` (a DLQ reason), never a wrong balance.
"""

from __future__ import annotations

import re
from collections import defaultdict
from decimal import Context, Decimal, Inexact

from tasks.core.codec import CodecError
from tasks.core.events import UserTransaction, split_symbol

# Exact arithmetic or a reject: the codec's decimal limits (tasks.core.codec: <= 40 digits,
# exponent >= -40, < 1e19) make every transaction's effects fit 100 digits (qty * price
# +- fee spans at most 10**-80 .. 10**19), so ``effects`` never rounds a codec-valid one
# (tests/core/test_codec.py tries the corners). A balance folded from many stays exact
# while its digits span at most 100 places; anything that would round is refused
# rather than stored wrong.
EXACT = Context(prec=100, traps=[Inexact])
_ASSET = re.compile(r"[A-Za-z0-9]{1,32}")


def effects(tx: UserTransaction) -> list[tuple[str, Decimal]]:
    """The balance changes of one transaction: ``[(asset, delta), ...]``.

    Filled buy of BASE-QUOTE: base += qty, quote -= qty*price + fee; filled sell:
    base -= qty, quote += qty*price - fee; deposit: asset += qty - fee. Cancelled and
    rejected orders change nothing. Raises ``CodecError`` for what cannot be applied.
    """
    if tx.side == "deposit":
        if _ASSET.fullmatch(tx.symbol) is None:
            raise CodecError(f"symbol: a deposit names one asset, got {tx.symbol!r:.40}")
        return [(tx.symbol, EXACT.subtract(tx.qty, tx.fee))] if tx.status == "filled" else []
    try:
        base, quote = split_symbol(tx.symbol)
    except ValueError:
        base = quote = ""
    if _ASSET.fullmatch(base) is None or _ASSET.fullmatch(quote) is None:
        raise CodecError(f"symbol: expected BASE-QUOTE, got {tx.symbol!r:.40}")
    if tx.status != "filled":
        return []
    try:
        notional = EXACT.multiply(tx.qty, tx.price)
        if tx.side == "buy":
            return [(base, tx.qty), (quote, EXACT.minus(EXACT.add(notional, tx.fee)))]
        return [(base, EXACT.minus(tx.qty)), (quote, EXACT.subtract(notional, tx.fee))]
    except Inexact:
        raise CodecError("qty*price: not exact within 100 digits") from None


def wallet_id(user_id: str, asset: str) -> str:
    """Unambiguous: assets never contain ':' (see effects)."""
    return f"{user_id}:{asset}"


def wallet_balances(db) -> dict[str, Decimal]:
    """Every wallet's balance by wallet id (for checks and reports)."""
    return {d["_id"]: Decimal(d["balance"]) for d in db.wallets.find({}, {"balance": 1})}


def fold_transactions(db) -> dict[str, Decimal]:
    """Balances recomputed from the stored transactions alone (the reference for tests)."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    for d in db.transactions.find({}):
        tx = UserTransaction(
            d["_id"], d["user_id"], d["symbol"], d["side"], Decimal(d["qty"]),
            Decimal(d["price"]), Decimal(d["fee"]), d["status"], d["event_us"],
        )  # fmt: skip
        for asset, delta in effects(tx):
            out[wallet_id(tx.user_id, asset)] = EXACT.add(out[wallet_id(tx.user_id, asset)], delta)
    return dict(out)
