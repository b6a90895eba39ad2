"""The PostgreSQL sink of ``drain_prices``: trades, quotes and order-book snapshots,
exactly-once in effect.

Delivery guarantee, kept here: one batch is one SERIALIZABLE transaction that
1. locks this consumer's offset rows and checks they still hold the offsets the batch
   starts from (a fence: a concurrent or zombie drain that moved them makes this batch
   ``Fenced``, and nothing is written),
2. COPYs trades and book snapshots straight into their tables, and quotes into a
   staging table moved with one INSERT; a batch that holds keys already stored (a
   duplicate key undoes the first try, to a savepoint) goes through staging with
   ``ON CONFLICT DO NOTHING`` instead (natural keys make replays harmless),
3. upserts ``quotes_latest`` only forwards in (event_us, update_id, recv_us),
4. stores the batch's next offsets.
Book deltas are read and counted (``Written.skipped``) but not stored: only snapshots
are, one row each in ``book_snapshots`` (key venue, symbol, event_us; the first wins).
A crash before COMMIT leaves nothing; after COMMIT the offsets say the batch is done, so
Kafka's own committed offsets are only a lag display. Serialization failures, deadlocks
and lost connections are retried here (reconnecting), within a deadline.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import psycopg2
import psycopg2.errorcodes
import psycopg2.errors
import psycopg2.extensions

from tasks.core.codec import (
    MAX_FUTURE_US,
    MIN_TIME_US,
    TRADE_PATTERN,
    CodecError,
    decode,
    is_book_delta,
)
from tasks.core.events import BookLevel, BookUpdate, Quote, Trade
from tasks.core.pg import connect
from tasks.drain.contract import Fenced, Rejected, Written

log = _log = logging.getLogger(__name__)

_RETRY_CODES = {
    psycopg2.errorcodes.SERIALIZATION_FAILURE,
    psycopg2.errorcodes.DEADLOCK_DETECTED,
    psycopg2.errorcodes.UNIQUE_VIOLATION,  # two first-time drains inserting one offset row
}
# PostgreSQL refuses the data itself (SQLSTATE classes): 22 data exception (numeric field
# overflow, invalid text), 23 integrity constraint violation (a CHECK; unique violations
# are handled by ON CONFLICT and retried), 54 program limit exceeded (an index row too
# large). Retrying cannot help: the records are isolated and dead-lettered instead.
# psycopg2 raises class 54 as OperationalError, the class of a lost connection, so the
# SQLSTATE decides, never the exception class.
_DATA_CLASSES = ("22", "23", "54")
TopicPartition = tuple[str, int]


def _refused_as_data(e: psycopg2.Error) -> bool:
    code = e.pgcode or ""
    return code[:2] in _DATA_CLASSES and code not in _RETRY_CODES


# --- rows -----------------------------------------------------------------------------
_MIN_TIME = str(MIN_TIME_US).encode()
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(s: str) -> str:
    return s.translate(_COPY_ESCAPES)


def trade_line(t: Trade) -> bytes:
    """One COPY text line (no newline) in the column order of ``trades``."""
    return (
        f"{_text(t.venue)}\t{_text(t.symbol)}\t{_text(t.venue_symbol)}\t{t.trade_id}\t"
        f"{t.price}\t{t.qty}\t{t.side}\t{t.event_us}\t{t.recv_us}"
    ).encode()


def quote_line(q: Quote) -> bytes:
    update_id = r"\N" if q.update_id is None else str(q.update_id)
    return (
        f"{_text(q.venue)}\t{_text(q.symbol)}\t{_text(q.venue_symbol)}\t{update_id}\t"
        f"{q.bid_price}\t{q.bid_qty}\t{q.ask_price}\t{q.ask_qty}\t{q.event_us}\t{q.recv_us}"
    ).encode()


def _array(values: Iterable[Any]) -> str:
    """A PostgreSQL array literal of decimals (no quoting needed: digits, '.', 'E', sign)."""
    return "{" + ",".join(map(str, values)) + "}"


def _side(levels: tuple[BookLevel, ...]) -> str:
    return f"{_array(p for p, _ in levels)}\t{_array(q for _, q in levels)}"


def book_line(b: BookUpdate) -> bytes:
    """One COPY text line in the column order of ``book_snapshots`` (a snapshot)."""
    return (
        f"{_text(b.venue)}\t{_text(b.symbol)}\t{b.event_us}\t{b.seq}\t{b.depth}\t{b.recv_us}\t"
        f"{_side(b.bids)}\t{_side(b.asks)}"
    ).encode()


class PriceBatch:
    """Trades, quotes and book snapshots of one batch as COPY lines; book deltas are
    counted in ``skipped`` and dropped (they stay on Kafka); anything else is a reject."""

    def __init__(self) -> None:
        self.trades: list[bytes] = []
        self.quotes: list[bytes] = []
        self.books: list[bytes] = []
        # the Kafka record of each line, so a line the table refuses goes to the DLQ
        self.trade_records: list[Any] = []
        self.quote_records: list[Any] = []
        self.book_records: list[Any] = []
        self.skipped = 0  # book deltas: read, not stored
        # newest trade event time per (venue, symbol), as the digits the lines carry
        self.newest: dict[tuple[bytes, bytes], bytes] = {}
        self._max_time = str(time.time_ns() // 1000 + MAX_FUTURE_US).encode()

    def __len__(self) -> int:
        return len(self.trades) + len(self.quotes) + len(self.books)

    def add(self, topic: str, partition: int, records: Iterable[Any]) -> list[tuple[Any, str]]:
        """Take one partition's records; returns ``(record, reason)`` for each reject."""
        rejects = []
        match, trades, sources = TRADE_PATTERN.fullmatch, self.trades, self.trade_records
        min_t, max_t = _MIN_TIME, self._max_time
        join, newest = b"\t".join, self.newest
        for rec in records:
            m = match(rec.value) if type(rec.value) is bytes else None
            if m is not None:
                g = m.groups()
                # same-length digit strings compare like the numbers they spell
                if (
                    min_t <= g[7] <= max_t
                    and min_t <= g[8] <= max_t
                    and g[4].strip(b"0.")
                    and g[5].strip(b"0.")
                ):
                    trades.append(join(g))
                    sources.append(rec)
                    if g[7] > newest.get(g[:2], b""):  # (the same-length rule again)
                        newest[g[:2]] = g[7]
                    continue
            reason = self._slow(rec)
            if reason is not None:
                rejects.append((rec, reason))
        return rejects

    def _slow(self, rec: Any) -> str | None:
        if type(rec.value) is bytes and is_book_delta(rec.value):
            self.skipped += 1  # a delta, or malformed after its opening: never a snapshot
            return None
        try:
            event = decode(rec.value)
        except CodecError as e:
            return e.reason
        if type(event) is Trade:
            self.trades.append(trade_line(event))
            self.trade_records.append(rec)
            self._saw(event)
        elif type(event) is Quote:
            self.quotes.append(quote_line(event))
            self.quote_records.append(rec)
        elif type(event) is BookUpdate:
            if event.kind != "snapshot":
                self.skipped += 1
            else:
                self.books.append(book_line(event))
                self.book_records.append(rec)
        else:
            return f"unexpected event type {type(event).__name__} for the price history"
        return None

    def _saw(self, t: Trade) -> None:
        key, at = (t.venue.encode(), t.symbol.encode()), str(t.event_us).encode()
        if at > self.newest.get(key, b""):
            self.newest[key] = at

    def newest_us(self) -> dict[tuple[str, str], int]:
        """The newest trade event time per (venue, symbol): what freshness is made of."""
        return {(v.decode(), s.decode()): int(t) for (v, s), t in self.newest.items()}

    def drop(self, records: list[Any]) -> None:
        gone = {id(r) for r in records}
        pairs = (
            (self.trades, self.trade_records),
            (self.quotes, self.quote_records),
            (self.books, self.book_records),
        )
        for lines, sources in pairs:
            kept = [(line, r) for line, r in zip(lines, sources, strict=True) if id(r) not in gone]
            lines[:] = [line for line, _ in kept]
            sources[:] = [r for _, r in kept]
        self.newest = {}
        for rec in self.trade_records:  # without the dropped trades' times (a rare path)
            self._saw(decode(rec.value))


# --- writes ---------------------------------------------------------------------------


_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS stage_trades (LIKE trades) ON COMMIT DELETE ROWS;"
    "CREATE TEMP TABLE IF NOT EXISTS stage_quotes (LIKE quotes) ON COMMIT DELETE ROWS;"
    "CREATE TEMP TABLE IF NOT EXISTS stage_book_snapshots (LIKE book_snapshots)"
    " ON COMMIT DELETE ROWS;"
)
_QUOTES_LATEST = """
INSERT INTO quotes_latest
SELECT DISTINCT ON (venue, symbol) * FROM stage_quotes
ORDER BY venue, symbol, event_us DESC, update_id DESC NULLS LAST, recv_us DESC
ON CONFLICT (venue, symbol) DO UPDATE SET
    venue_symbol = EXCLUDED.venue_symbol, update_id = EXCLUDED.update_id,
    bid_price = EXCLUDED.bid_price, bid_qty = EXCLUDED.bid_qty,
    ask_price = EXCLUDED.ask_price, ask_qty = EXCLUDED.ask_qty,
    event_us = EXCLUDED.event_us, recv_us = EXCLUDED.recv_us
WHERE (EXCLUDED.event_us, coalesce(EXCLUDED.update_id, -1), EXCLUDED.recv_us)
    > (quotes_latest.event_us, coalesce(quotes_latest.update_id, -1), quotes_latest.recv_us)
"""


class PostgresSink:
    """Writes PriceBatches; one connection, used by one thread at a time."""

    name = "postgres"

    def __init__(self, dsn: str, schema: str = "public", *, retry_seconds: float = 60.0):
        self.dsn, self.schema, self.retry_seconds = dsn, schema, retry_seconds
        self._conn: Any = None
        self._side_conn: Any = None  # reads on the main thread

    def open_batch(self) -> PriceBatch:
        return PriceBatch()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            conn = connect(self.dsn, self.schema)
            conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
            with conn, conn.cursor() as cur:
                cur.execute(_STAGE)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        self._drop_writer()
        if self._side_conn is not None:
            self._side_conn.close()
        self._side_conn = None

    def _drop_writer(self) -> None:
        """Forget the writer's connection only: the main thread may be reading on the
        side connection at this moment."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def stored_offsets(self, consumer: str, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """Committed offsets, read on the side connection: the writer's may be mid-batch."""
        rows = self._side(
            "SELECT topic, partition, next_offset FROM kafka_offsets"
            " WHERE consumer = %s AND topic = ANY(%s)",
            (consumer, list(topics)),
        )
        return {(t, p): o for t, p, o in rows}

    def take_over(self, consumer: str) -> int:
        (gen,) = self._side(
            "INSERT INTO drain_followers (consumer, generation) VALUES (%s, 1)"
            " ON CONFLICT (consumer) DO UPDATE"
            " SET generation = drain_followers.generation + 1, taken_at = now()"
            " RETURNING generation",
            (consumer,),
        )[0]
        return gen

    def generation(self, consumer: str) -> int:
        rows = self._side(
            "SELECT generation FROM drain_followers WHERE consumer = %s", (consumer,), retry=False
        )
        return rows[0][0] if rows else 0

    def _side(self, query: str, args: tuple, *, retry: bool = True) -> list[tuple]:
        """One autocommitted statement on the main thread's own connection (the writer
        thread holds the other); lost connections are retried until the deadline, or not
        at all (``retry=False``: the caller asks again later)."""
        deadline = time.monotonic() + self.retry_seconds
        while True:
            try:
                if self._side_conn is None or self._side_conn.closed:
                    self._side_conn = connect(self.dsn, self.schema)
                    self._side_conn.autocommit = True
                with self._side_conn.cursor() as cur:
                    cur.execute(query, args)
                    return cur.fetchall()
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                if self._side_conn is not None:
                    self._side_conn.close()
                self._side_conn = None
                if not retry or time.monotonic() > deadline:
                    raise
                log.warning("postgres sink: reading failed, retrying: %s", str(e).strip()[:80])
                time.sleep(0.5)

    def claim_log(self, consumer: str, topic: str, log: str, *, reset: bool = False) -> str | None:
        def claim(conn) -> str | None:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT log_id FROM kafka_logs WHERE consumer = %s AND topic = %s FOR UPDATE",
                    (consumer, topic),
                )
                row = cur.fetchone()
                before = row[0] if row else None
                if before is not None and before != log and not reset:
                    return before
                if reset and before != log:
                    cur.execute(
                        "DELETE FROM kafka_offsets WHERE consumer = %s AND topic = %s",
                        (consumer, topic),
                    )
                    log_line = "%s %s: offsets forgotten, now log %s (was %s)"
                    _log.warning(log_line, consumer, topic, log, before)
                cur.execute(
                    "INSERT INTO kafka_logs (consumer, topic, log_id) VALUES (%s, %s, %s)"
                    " ON CONFLICT (consumer, topic) DO UPDATE"
                    " SET log_id = EXCLUDED.log_id, updated_at = now()",
                    (consumer, topic, log),
                )
                return before

        return self._retrying(claim)

    def write(
        self,
        consumer: str,
        batch: PriceBatch,
        offsets: dict[TopicPartition, tuple[int | None, int]],
    ) -> Written:
        """Store ``batch`` and move each partition from its expected to its next offset."""
        return self._retrying(
            lambda conn: self._write_once(conn, consumer, batch, offsets),
            isolate=lambda conn: self._isolate(conn, batch),
        )

    def _write_once(self, conn, consumer, batch: PriceBatch, offsets) -> Written:
        out = Written()
        if batch.skipped:
            out.skipped["book_deltas"] = batch.skipped
        with conn, conn.cursor() as cur:
            if self._fence(cur, consumer, offsets):
                out.duplicates = {
                    "trades": len(batch.trades),
                    "quotes": len(batch.quotes),
                    "book_snapshots": len(batch.books),
                }
                return out  # this exact batch is already stored (an ambiguous commit)
            if batch.trades:
                inserted = _copy(cur, "trades", batch.trades)
                out.rows["trades"] = inserted
                out.duplicates["trades"] = len(batch.trades) - inserted
                out.newest_us = batch.newest_us()
            if batch.quotes:
                inserted = _copy_insert(cur, "quotes", _copy_data(batch.quotes))
                out.rows["quotes"] = inserted
                out.duplicates["quotes"] = len(batch.quotes) - inserted
                cur.execute(_QUOTES_LATEST)
                out.rows["quotes_latest"] = cur.rowcount
            if batch.books:
                inserted = _copy(cur, "book_snapshots", batch.books)
                out.rows["book_snapshots"] = inserted
                out.duplicates["book_snapshots"] = len(batch.books) - inserted
            cur.executemany(
                "INSERT INTO kafka_offsets (consumer, topic, partition, next_offset)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (consumer, topic, partition)"
                " DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                [(consumer, t, p, nxt) for (t, p), (_, nxt) in offsets.items()],
            )
        return out

    @staticmethod
    def _fence(cur, consumer: str, offsets) -> bool:
        """Lock the offset rows; True when they already hold this batch's next offsets."""
        cur.execute(
            "SELECT topic, partition, next_offset FROM kafka_offsets WHERE consumer = %s"
            " AND (topic, partition) IN %s ORDER BY topic, partition FOR UPDATE",
            (consumer, tuple(offsets)),
        )
        stored = {(t, p): o for t, p, o in cur.fetchall()}
        if all(stored.get(tp) == nxt for tp, (_, nxt) in offsets.items()):
            return True
        moved = {tp: stored.get(tp) for tp, (exp, _) in offsets.items() if stored.get(tp) != exp}
        if moved:
            raise Fenced(f"offsets moved by another drain of {consumer!r}: {moved}")
        return False

    def _retrying(self, work, isolate=None):
        """Run ``work(conn)``; retry conflicts and lost connections until the deadline.
        Data the server refuses is never retried: ``isolate(conn)`` finds the refused
        records and raises ``Rejected``; when no record alone is refused, the error is
        raised as it is (the run fails loudly rather than retrying the same data)."""
        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return work(self._connection())
            except psycopg2.Error as e:
                if _refused_as_data(e):
                    if isolate is None:
                        raise
                    try:
                        isolate(self._connection())
                    except psycopg2.Error as during:  # lost mid-probe: the write is retried
                        if not isinstance(during, psycopg2.OperationalError):
                            raise
                        self._drop_writer()
                        why = f"connection while isolating: {str(during).strip()[:80]}"
                    else:
                        raise  # refused, but by no record alone: fail loudly
                elif e.pgcode in _RETRY_CODES:
                    why = e.pgcode
                elif isinstance(e, psycopg2.OperationalError | psycopg2.InterfaceError):
                    why = f"connection: {str(e).strip()[:80]}"  # lost or refused: reconnect
                    self._drop_writer()
                else:
                    raise
            delay = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
            if time.monotonic() + delay > deadline:
                raise TimeoutError(f"PostgreSQL write kept failing ({why}) for {attempt} tries")
            log.warning("postgres sink retry %d in %.2fs: %s", attempt, delay, why)
            time.sleep(delay)

    def _isolate(self, conn, batch: PriceBatch) -> None:
        """Find the lines the tables refuse (probes in savepoints, all undone) and raise
        ``Rejected`` with their records and PostgreSQL's reasons."""
        refused = []
        try:
            with conn.cursor() as cur:
                for table, lines, sources in (
                    ("trades", batch.trades, batch.trade_records),
                    ("quotes", batch.quotes, batch.quote_records),
                    ("book_snapshots", batch.books, batch.book_records),
                ):
                    for i, reason in _refused_lines(cur, table, lines):
                        refused.append((sources[i], f"postgres refused the {table} row: {reason}"))
        finally:
            conn.rollback()
        if refused:
            raise Rejected(refused)


def _copy(cur, table: str, lines: list[bytes]) -> int:
    """COPY lines straight into ``table``; returns how many were new.

    A batch usually holds no stored row, and COPY into the table costs PostgreSQL about a
    third less than COPY into staging plus INSERT ... SELECT (and needs no second pass), so
    that is tried first, in a savepoint; a duplicate key undoes it and the batch goes the
    staging way (``_copy_insert``), which skips the stored rows.
    """
    data = _copy_data(lines)
    cur.execute("SAVEPOINT direct")
    try:
        cur.copy_expert(f"COPY {table} FROM STDIN", io.BytesIO(data), size=len(data))
    except psycopg2.errors.UniqueViolation:
        cur.execute("ROLLBACK TO SAVEPOINT direct")
        return _copy_insert(cur, table, data, stored=True)
    cur.execute("RELEASE SAVEPOINT direct")
    return len(lines)


def _copy_data(lines: list[bytes]) -> bytes:
    """COPY text of ``lines``, one buffer: psycopg2 then reads it in one go (each chunk it
    reads needs the GIL back, which costs up to a switch interval, 5 ms, while the main
    thread is decoding)."""
    return b"\n".join(lines) + b"\n"


def _copy_insert(cur, table: str, data: bytes, *, stored: bool = False) -> int:
    """COPY ``data`` (``_copy_data``) into the staging table, move the new rows; returns
    how many were new.

    A plain INSERT costs ~30% less server CPU than ON CONFLICT DO NOTHING, and a batch
    usually has no stored rows, so that is tried first unless the batch is known to hold
    some (``stored``); a duplicate key undoes it (to the savepoint) and the batch goes
    again with ON CONFLICT DO NOTHING.
    """
    cur.copy_expert(f"COPY stage_{table} FROM STDIN", io.BytesIO(data), size=len(data))
    if not stored:
        cur.execute("SAVEPOINT fresh")
        try:
            cur.execute(f"INSERT INTO {table} SELECT * FROM stage_{table}")
        except psycopg2.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT fresh")
        else:
            inserted = cur.rowcount
            cur.execute("RELEASE SAVEPOINT fresh")
            return inserted
    cur.execute(f"INSERT INTO {table} SELECT * FROM stage_{table} ON CONFLICT DO NOTHING")
    return cur.rowcount


def _refused_lines(cur, table: str, lines: list[bytes]) -> list[tuple[int, str]]:
    """Indexes of the lines ``table`` refuses as data, with the server's reason: found by
    bisection, each probe a COPY + INSERT in a savepoint that is rolled back. k refused
    lines of n cost about 2k log2(n) probes; poison is rare, so this path may be slow."""
    out: list[tuple[int, str]] = []
    todo = [(0, len(lines))] if lines else []
    while todo:
        lo, hi = todo.pop()
        cur.execute("SAVEPOINT probe")
        try:
            data = b"\n".join(lines[lo:hi]) + b"\n"
            cur.copy_expert(f"COPY stage_{table} FROM STDIN", io.BytesIO(data), size=len(data))
            cur.execute(f"INSERT INTO {table} SELECT * FROM stage_{table} ON CONFLICT DO NOTHING")
        except psycopg2.Error as e:
            if not _refused_as_data(e):
                raise
            if hi - lo == 1:
                first = (e.pgerror or str(e)).strip().splitlines()[0][:300]
                out.append((lo, f"{e.pgcode} {first}"))
            else:
                mid = (lo + hi) // 2
                todo += [(mid, hi), (lo, mid)]
        cur.execute("ROLLBACK TO SAVEPOINT probe")
    return sorted(out)
