"""Candles and indicators in PostgreSQL: which windows to compute, and storing results.

Windows to (re)compute come from ``candle_dirty``: a trigger on ``trades`` (migration
``0100_aggregate.sql``) records, in the inserting transaction, every (venue, symbol,
minute) a statement inserted trades into. So late trades, gap repairs, REST backfills
and topic replays all mark their windows, whoever wrote them, and nothing is missed
however late the drain runs (an insert-time watermark would race with transactions
still open when it is read). ``claim_dirty`` moves those rows, per configured interval,
into ``candle_pending``; a window leaves ``candle_pending`` in the transaction that
stores its candle, once it is final.

Writes are idempotent upserts that change a row only when a value differs
(``IS DISTINCT FROM``) and return what changed, so recomputing an unchanged window
writes nothing and publishes nothing. Each series is recomputed under a transaction-
scoped advisory lock, so the scheduled aggregate and an ad hoc rebuild of the same
series never interleave their indicator chains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pandas as pd
from psycopg2.extras import execute_values

from tasks.analytics import candles as cdl
from tasks.analytics import indicators as ind
from tasks.core.events import Candle

_CANDLE_VALUES = ("open", "high", "low", "close", "volume", "trade_count", "vwap")
_CANDLE_SELECT = ", ".join(cdl.CANDLE_COLUMNS)
_IND_VALUES = ("spec", "sma", "ewma", "pct_change", "roll_min", "roll_max", "roll_volume")


@dataclass(frozen=True, order=True)
class SeriesKey:
    """One candle series. A window holds one candle, from our trades (source 'trades')
    or, where we have none, the venue's kline (source 'venue'); indicators run over the
    series whatever each candle's source."""

    venue: str
    symbol: str
    interval: str

    @property
    def width_us(self) -> int:
        return cdl.interval_us(self.interval)


def lock_series(conn, key: SeriesKey) -> None:
    """Hold the series' advisory lock until this transaction ends."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 6))",
            ("|".join((key.venue, key.symbol, key.interval)),),
        )


# ---- dirty windows -----------------------------------------------------------------------


CLAIM_BATCH = 100_000  # dirty rows moved per transaction


def claim_dirty(conn, intervals: Sequence[str], limit: int = CLAIM_BATCH) -> int:
    """Move up to ``limit`` dirty minutes into pending windows of every interval, in one
    transaction; returns how many dirty rows were claimed."""
    widths = [cdl.interval_us(i) for i in intervals]
    with conn, conn.cursor() as cur:
        cur.execute(
            """WITH claimed AS (
                 DELETE FROM candle_dirty WHERE seq IN (
                   SELECT seq FROM candle_dirty ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)
                 RETURNING venue, symbol, minute_us),
               pending AS (
                 INSERT INTO candle_pending (venue, symbol, interval, open_us)
                 SELECT DISTINCT c.venue, c.symbol, i.interval,
                        c.minute_us - c.minute_us %% i.width
                 FROM claimed c CROSS JOIN unnest(%s::text[], %s::bigint[]) AS i(interval, width)
                 ON CONFLICT DO NOTHING)
               SELECT count(*) FROM claimed""",
            (limit, list(intervals), widths),
        )
        return cur.fetchone()[0]


def final_pending(conn, interval: str, last_final_open: int) -> dict[tuple[str, str], list[int]]:
    """Pending windows of ``interval`` that are final, by (venue, symbol)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT venue, symbol, array_agg(open_us ORDER BY open_us) FROM candle_pending
               WHERE interval = %s AND open_us <= %s GROUP BY venue, symbol
               ORDER BY venue, symbol""",
            (interval, last_final_open),
        )
        return {(v, s): list(opens) for v, s, opens in cur.fetchall()}


def clear_pending(cur, key: SeriesKey, opens: Sequence[int]) -> None:
    cur.execute(
        """DELETE FROM candle_pending WHERE venue = %s AND symbol = %s AND interval = %s
           AND open_us = ANY(%s)""",
        (key.venue, key.symbol, key.interval, list(opens)),
    )


# ---- trades in -----------------------------------------------------------------------------


def trades_in_windows(conn, key: SeriesKey, opens: Sequence[int]) -> pd.DataFrame:
    """The trades of the given windows (one index range scan per window)."""
    with conn.cursor() as cur:
        cur.execute(
            """SELECT t.venue, t.symbol, t.trade_id, t.price, t.qty, t.event_us
               FROM unnest(%s::bigint[]) AS w(open_us)
               JOIN trades t ON t.venue = %s AND t.symbol = %s
                AND t.event_us >= w.open_us AND t.event_us < w.open_us + %s""",
            (list(opens), key.venue, key.symbol, key.width_us),
        )
        return cdl.trades_frame(cur.fetchall())


def trades_between(conn, venue: str, symbol: str, start_us: int, end_us: int) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(
            """SELECT venue, symbol, trade_id, price, qty, event_us FROM trades
               WHERE venue = %s AND symbol = %s AND event_us >= %s AND event_us < %s""",
            (venue, symbol, start_us, end_us),
        )
        return cdl.trades_frame(cur.fetchall())


# ---- candles ------------------------------------------------------------------------------


def upsert_candles(cur, frame: pd.DataFrame) -> list[Candle]:
    """Insert or update candles (``tasks.analytics.candles.CANDLE_COLUMNS``); returns the rows that
    are new or differ from what was stored. A candle from trades replaces a venue kline
    of its window; a venue kline never replaces a candle from trades."""
    if frame.empty:
        return []
    rows = list(frame[list(cdl.CANDLE_COLUMNS)].itertuples(index=False, name=None))
    values = (*_CANDLE_VALUES, "source")
    changed = ", ".join(f"{c} = excluded.{c}" for c in values)
    stored = ", ".join(f"candles.{c}" for c in values)
    fresh = ", ".join(f"excluded.{c}" for c in values)
    out = execute_values(
        cur,
        f"""INSERT INTO candles ({_CANDLE_SELECT}) VALUES %s
            ON CONFLICT (venue, symbol, interval, open_us) DO UPDATE SET {changed}
            WHERE (candles.source = 'venue' OR excluded.source = 'trades')
              AND ({stored}) IS DISTINCT FROM ({fresh})
            RETURNING {_CANDLE_SELECT}""",
        rows,
        page_size=1000,
        fetch=True,
    )
    return sorted((_candle(r) for r in out), key=lambda c: (c.venue, c.symbol, c.open_us))


def delete_candles(cur, key: SeriesKey, opens: Iterable[int]) -> int:
    """Remove candles computed from trades of windows that (no longer) hold trades;
    venue klines stay."""
    cur.execute(
        """DELETE FROM candles WHERE venue = %s AND symbol = %s AND interval = %s
           AND source = 'trades' AND open_us = ANY(%s)""",
        (key.venue, key.symbol, key.interval, list(opens)),
    )
    return cur.rowcount


def _candle(row: Sequence[Any]) -> Candle:
    return Candle(*row[:9], int(row[9]), *row[10:])


def _series_where(key: SeriesKey) -> tuple[str, tuple]:
    return (
        "venue = %s AND symbol = %s AND interval = %s",
        (key.venue, key.symbol, key.interval),
    )


def candles_after(
    conn, key: SeriesKey, after_us: int, before_us: int | None = None
) -> list[Candle]:
    """Candles with after_us < open_us (< before_us), ascending."""
    where, args = _series_where(key)
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {_CANDLE_SELECT} FROM candles WHERE {where} AND open_us > %s"
            " AND open_us < %s ORDER BY open_us",
            (*args, after_us, before_us if before_us is not None else 2**63 - 1),
        )
        return [_candle(r) for r in cur.fetchall()]


def latest_candle(conn, key: SeriesKey) -> Candle | None:
    where, args = _series_where(key)
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {_CANDLE_SELECT} FROM candles WHERE {where} ORDER BY open_us DESC LIMIT 1",
            args,
        )
        row = cur.fetchone()
    return _candle(row) if row else None


def close_before(conn, key: SeriesKey, t_us: int) -> Decimal | None:
    """Close of the newest candle opening before ``t_us``."""
    where, args = _series_where(key)
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT close FROM candles WHERE {where} AND open_us < %s"
            " ORDER BY open_us DESC LIMIT 1",
            (*args, t_us),
        )
        row = cur.fetchone()
    return row[0] if row else None


# ---- indicators -----------------------------------------------------------------------------


def _anchor(cur, key: SeriesKey, before_us: int, spec: ind.Spec) -> tuple[bool, ind.Anchor | None]:
    """(a candle precedes ``before_us``, its anchor if its stored EWMA has this spec)."""
    cur.execute(
        """SELECT c.open_us, c.close, i.ewma, i.spec FROM candles c
           LEFT JOIN candle_indicators i USING (venue, symbol, interval, open_us)
           WHERE c.venue = %s AND c.symbol = %s AND c.interval = %s
             AND c.open_us < %s ORDER BY c.open_us DESC LIMIT 1""",
        (key.venue, key.symbol, key.interval, before_us),
    )
    row = cur.fetchone()
    if row is None:
        return False, None
    open_us, close, ewma, stored_spec = row
    if ewma is None or stored_spec != spec.text():
        return True, None
    return True, ind.Anchor(open_us, close, ewma)


def _series_start(cur, key: SeriesKey) -> int | None:
    where, args = _series_where(key)
    cur.execute(f"SELECT min(open_us) FROM candles WHERE {where}", args)
    return cur.fetchone()[0]


def recompute_indicators(
    cur,
    key: SeriesKey,
    from_us: int,
    spec: ind.Spec,
    until_us: int | None = None,
    chunk: int = 20_000,
) -> int:
    """Recompute the indicators of the series' candles opening in [from_us, until_us)
    (None: to its end, as an EWMA change ripples forward), ``chunk`` windows at a time;
    returns the rows changed. Starts over from the series' first candle when the
    preceding EWMA is missing or was computed with other parameters."""
    width = key.width_us
    where, args = _series_where(key)
    preceded, anchor = _anchor(cur, key, from_us, spec)
    if preceded and anchor is None:
        from_us = _series_start(cur, key)
    changed = 0
    emit_from: int | None = from_us
    while emit_from is not None and (until_us is None or emit_from < until_us):
        emit_to = emit_from + chunk * width
        if until_us is not None:
            emit_to = min(emit_to, until_us)
        load_from = emit_from - spec.lookback * width
        cur.execute(
            f"""SELECT open_us, high, low, close, volume FROM candles WHERE {where}
                AND open_us >= %s AND open_us < %s ORDER BY open_us""",
            (*args, load_from, emit_to),
        )
        frame = pd.DataFrame(cur.fetchall(), columns=["open_us", "high", "low", "close", "volume"])
        cur.execute(
            f"SELECT close FROM candles WHERE {where} AND open_us < %s"
            " ORDER BY open_us DESC LIMIT 1",
            (*args, load_from),
        )
        prior = cur.fetchone()
        rows = ind.compute(frame, width, spec, emit_from, prior and prior[0], anchor)
        if not rows.empty:
            changed += _upsert_indicators(cur, key, spec, rows)
            last = rows.iloc[-1]
            close = frame["close"].iloc[-1]  # the frame ends with the last emitted candle
            anchor = ind.Anchor(int(last["open_us"]), close, last["ewma"])
        cur.execute(  # after a long silence, jump to the next candle
            f"SELECT min(open_us) FROM candles WHERE {where} AND open_us >= %s",
            (*args, emit_to),
        )
        emit_from = cur.fetchone()[0]
    return changed


def _upsert_indicators(cur, key: SeriesKey, spec: ind.Spec, rows: pd.DataFrame) -> int:
    if rows.empty:
        return 0
    values = [
        (key.venue, key.symbol, key.interval, int(r[0]), spec.text(), *r[1:])
        for r in rows[list(ind.COLUMNS)].itertuples(index=False, name=None)
    ]
    cols = ", ".join(_IND_VALUES)
    changed = ", ".join(f"{c} = excluded.{c}" for c in _IND_VALUES)
    stored = ", ".join(f"candle_indicators.{c}" for c in _IND_VALUES)
    fresh = ", ".join(f"excluded.{c}" for c in _IND_VALUES)
    out = execute_values(
        cur,
        f"""INSERT INTO candle_indicators (venue, symbol, interval, open_us, {cols})
            VALUES %s ON CONFLICT (venue, symbol, interval, open_us)
            DO UPDATE SET {changed}, computed_at = now()
            WHERE ({stored}) IS DISTINCT FROM ({fresh}) RETURNING open_us""",
        values,
        page_size=1000,
        fetch=True,
    )
    return len(out)


def indicators_at(conn, key: SeriesKey, opens: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Stored indicator rows of the given candles, by open time."""
    with conn.cursor() as cur:
        cur.execute(
            f"""SELECT open_us, {", ".join(_IND_VALUES)} FROM candle_indicators
                WHERE venue = %s AND symbol = %s AND interval = %s AND open_us = ANY(%s)""",
            (key.venue, key.symbol, key.interval, list(opens)),
        )
        return {r[0]: dict(zip(_IND_VALUES, r[1:], strict=True)) for r in cur.fetchall()}
