"""Price alerts on final candles: threshold crossings and large moves, once per crossing.

Rules live in PostgreSQL (``alert_rules``; ``save_rule`` adds or changes one), so
operators change them without a deploy. Each rule watches one candle series (venue,
symbol, interval) and has a condition on each candle's close:

- ``above``: close > level; ``below``: close < level;
- ``move``: |percent change of the close over ``window`` windows| >= ``move_pct``
  (empty windows carry the previous close, as in ``tasks.analytics.indicators``).

**Once per crossing.** An alert fires when the condition turns from false to true, and
not again until it has been false and turns true again. A rule's first candle only
teaches it which side it is on (a crossing needs a before), so adding a rule while the
price is already above its level does not fire. Candles are evaluated in open-time
order, each once: ``alert_state`` holds, per rule, whether the condition held at the
last evaluated candle and that candle's open time, so a recomputed old candle never
fires and a restart continues where the last run stopped.

**Delivery.** The state change and the alert row (``alerts``, an outbox) commit in one
transaction; ``publish_pending`` then sends unpublished alerts to ``market.alerts``
(keyed by symbol), waits for the broker's acks, and marks them published. A crash
between the ack and that mark sends the same alert again on the next run with the same
``alert_id`` (rule and candle), which consumers use to drop the repeat; a crash before
the commit evaluates the candle again. So no crossing is lost and none fires twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pandas as pd

from tasks.analytics import candle_store
from tasks.analytics.candles import interval_us
from tasks.analytics.indicators import on_grid, pct_change
from tasks.core import codec
from tasks.core.events import Candle
from tasks.core.topics import ALERTS

KINDS = ("above", "below", "move")


@dataclass(frozen=True)
class Rule:
    rule_id: str
    venue: str
    symbol: str
    kind: str  # above | below | move
    level: Decimal | None = None  # above / below
    move_pct: Decimal | None = None  # move: absolute percent, e.g. Decimal("2.5")
    window: int = 1  # move: over this many windows of ``interval``
    interval: str = "1m"

    def __post_init__(self) -> None:
        interval_us(self.interval)
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.rule_id}: kind must be one of {KINDS}")
        if self.kind == "move":
            if self.move_pct is None or self.move_pct <= 0 or self.window < 1:
                raise ValueError(f"rule {self.rule_id}: a move needs move_pct > 0, window >= 1")
        elif self.level is None or self.level <= 0:
            raise ValueError(f"rule {self.rule_id}: {self.kind} needs a level > 0")


@dataclass(frozen=True)
class State:
    active: bool  # the condition held at the last evaluated candle
    last_open_us: int


@dataclass(frozen=True)
class Alert:
    rule: Rule
    candle: Candle
    change_pct: Decimal | None = None  # move alerts: the move that fired

    @property
    def alert_id(self) -> str:
        return f"{self.rule.rule_id}:{self.candle.open_us}"

    def to_dict(self) -> dict[str, Any]:
        r = self.rule
        return {
            "v": 1,
            "t": "alert",
            "alert_id": self.alert_id,
            "rule_id": r.rule_id,
            "kind": r.kind,
            "venue": r.venue,
            "symbol": r.symbol,
            "interval": r.interval,
            "level": None if r.level is None else str(r.level),
            "move_pct": None if r.move_pct is None else str(r.move_pct),
            "window": r.window,
            "price": str(self.candle.close),
            "change_pct": None if self.change_pct is None else str(self.change_pct),
            "open_us": self.candle.open_us,
            "candle": codec.to_dict(self.candle),
        }


def evaluate(
    rule: Rule,
    state: State | None,
    candles: Sequence[Candle],
    closes: dict[int, Decimal] | None = None,
) -> tuple[State | None, list[Alert]]:
    """Walk ``candles`` (ascending, all newer than ``state``) and return the new state
    and the alerts fired. ``closes``: close of every window on the grid (empty ones
    carried) from ``window`` windows before the first candle on; needed for moves."""
    width = interval_us(rule.interval)
    fired: list[Alert] = []
    for c in candles:
        if state is not None and c.open_us <= state.last_open_us:
            raise ValueError(f"rule {rule.rule_id}: candle {c.open_us} already evaluated")
        change = None
        if rule.kind == "above":
            active = c.close > rule.level
        elif rule.kind == "below":
            active = c.close < rule.level
        else:
            base = (closes or {}).get(c.open_us - rule.window * width)
            change = None if base is None else pct_change(base, c.close)
            active = change is not None and abs(change) >= rule.move_pct
        if state is not None and active and not state.active:
            fired.append(Alert(rule, c, change))
        state = State(active, c.open_us)
    return state, fired


def grid_closes(candles: Sequence[Candle], start: int, prior_close: Decimal | None):
    """``closes`` for ``evaluate`` from the candles since ``start`` (ascending) and the
    close before them."""
    if not candles:
        return {}
    frame = pd.DataFrame(
        [(c.open_us, c.high, c.low, c.close, c.volume) for c in candles],
        columns=["open_us", "high", "low", "close", "volume"],
    )
    width = interval_us(candles[0].interval)
    first = start if prior_close is not None else candles[0].open_us
    g = on_grid(frame, width, first, prior_close)
    return dict(zip(g.index.tolist(), g["close"].tolist(), strict=True))


# ---- PostgreSQL and Kafka ---------------------------------------------------------------

_RULE_COLUMNS = "rule_id, venue, symbol, kind, level, move_pct, window_n, interval"


def save_rule(conn, rule: Rule, enabled: bool = True) -> None:
    """Add or change a rule (a changed rule keeps its state)."""
    with conn.cursor() as cur:
        cur.execute(
            f"""INSERT INTO alert_rules ({_RULE_COLUMNS}, enabled)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (rule_id) DO UPDATE SET venue = excluded.venue,
                  symbol = excluded.symbol, kind = excluded.kind, level = excluded.level,
                  move_pct = excluded.move_pct, window_n = excluded.window_n,
                  interval = excluded.interval, enabled = excluded.enabled""",
            (
                rule.rule_id,
                rule.venue,
                rule.symbol,
                rule.kind,
                rule.level,
                rule.move_pct,
                rule.window,
                rule.interval,
                enabled,
            ),
        )


def load_rules(conn, rule_ids: Iterable[str] | None = None) -> list[Rule]:
    with conn.cursor() as cur:
        if rule_ids is None:
            cur.execute(f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE enabled ORDER BY rule_id")
        else:
            cur.execute(
                f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE enabled AND rule_id = ANY(%s)"
                " ORDER BY rule_id",
                (list(rule_ids),),
            )
        return [Rule(*row) for row in cur.fetchall()]


def check_rule(conn, rule: Rule) -> list[Alert]:
    """Evaluate one rule on the candles stored since its state, in one transaction that
    writes the new state and the fired alerts to the outbox."""
    width = interval_us(rule.interval)
    with conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT active, last_open_us FROM alert_state WHERE rule_id = %s FOR UPDATE",
                (rule.rule_id,),
            )
            row = cur.fetchone()
        state = State(*row) if row else None
        key = candle_store.SeriesKey(rule.venue, rule.symbol, rule.interval)
        if state is None:  # first sight: learn the side from the newest candle only
            newest = candle_store.latest_candle(conn, key)
            candles = [newest] if newest else []
        else:
            candles = candle_store.candles_after(conn, key, state.last_open_us)
        if not candles:
            return []
        closes = None
        if rule.kind == "move":
            start = candles[0].open_us - rule.window * width
            history = candle_store.candles_after(conn, key, start - 1, candles[0].open_us)
            prior = candle_store.close_before(conn, key, start)
            closes = grid_closes([*history, *candles], start, prior)
        new_state, fired = evaluate(rule, state, candles, closes)
        with conn.cursor() as cur:
            cur.execute(
                """INSERT INTO alert_state (rule_id, active, last_open_us, updated_at)
                   VALUES (%s, %s, %s, now())
                   ON CONFLICT (rule_id) DO UPDATE SET active = excluded.active,
                     last_open_us = excluded.last_open_us, updated_at = now()""",
                (rule.rule_id, new_state.active, new_state.last_open_us),
            )
            for a in fired:
                cur.execute(
                    """INSERT INTO alerts (alert_id, rule_id, venue, symbol, open_us, payload)
                       VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (alert_id) DO NOTHING""",
                    (
                        a.alert_id,
                        rule.rule_id,
                        rule.venue,
                        rule.symbol,
                        a.candle.open_us,
                        json.dumps(a.to_dict(), separators=(",", ":")),
                    ),
                )
    return fired


def publish_pending(conn, producer, topic: str = ALERTS, timeout_s: float = 30.0) -> int:
    """Send every unpublished alert, oldest first; mark them once the broker acked."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT alert_id, symbol, payload FROM alerts WHERE published_at IS NULL"
            " ORDER BY created_at, alert_id"
        )
        pending = cur.fetchall()
    if not pending:
        return 0
    sent = [
        (alert_id, producer.send(topic, key=symbol.encode(), value=payload.encode()))
        for alert_id, symbol, payload in pending
    ]
    producer.flush(timeout=timeout_s)
    acked = [alert_id for alert_id, f in sent if f.succeeded()]
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE alerts SET published_at = now() WHERE alert_id = ANY(%s)", (acked,))
    if len(acked) < len(sent):
        raise RuntimeError(f"{len(sent) - len(acked)} alerts not acknowledged; they stay pending")
    return len(acked)
