"""Did the pipeline lose or double anything? Checks an operator (and the tests) can run.

For venues with sequential trade ids, a symbol's stored trades must form one unbroken
id range, and the trades topic must hold each of those ids exactly once. For venues
without them (Finnhub's dedupe keys; ``VenueSpec.sequential_ids``) there is no range to
have holes in, and the venue's own repeats reach Kafka by design; what must hold is that
every trade id in Kafka is stored, once (the primary key). These checks look only at
what was stored, so they hold whatever crashed or was retried on the way.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from kafka import TopicPartition

from tasks import venues
from tasks.core import codec, config
from tasks.core.events import BookUpdate, Event, Trade
from tasks.core.kafka import consumer


@dataclass
class SymbolCheck:
    symbol: str
    stored: int
    first_id: int
    last_id: int
    in_kafka: int = 0
    duplicates_in_kafka: int = 0
    missing_from_store: int = 0
    sequential: bool = True  # ids are contiguous per symbol (else: no holes to count)

    @property
    def holes(self) -> int:
        if not self.sequential:
            return 0
        return (self.last_id - self.first_id + 1) - self.stored


@dataclass
class Verdict:
    symbols: list[SymbolCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        for s in self.symbols:
            if s.holes:
                out.append(f"{s.symbol}: {s.holes} trade ids missing in {s.first_id}..{s.last_id}")
            if s.duplicates_in_kafka and s.sequential:  # else the venue's own repeats
                out.append(f"{s.symbol}: {s.duplicates_in_kafka} duplicate ids in Kafka")
            if s.missing_from_store:
                out.append(f"{s.symbol}: {s.missing_from_store} ids in Kafka but not stored")
        return out

    @property
    def ok(self) -> bool:
        return bool(self.symbols) and not self.problems


def stored_ranges(conn, venue: str, since_us: int = 0) -> dict[str, tuple[int, int, int]]:
    """Per symbol: (count, first id, last id) of the stored trades of ``venue`` received
    at or after ``since_us``."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, count(*), min(trade_id), max(trade_id) FROM trades"
            " WHERE venue = %s AND recv_us >= %s GROUP BY symbol",
            (venue, since_us),
        )
        return {sym: (n, lo, hi) for sym, n, lo, hi in cur.fetchall()}


def stored_ids(conn, venue: str, since_us: int = 0) -> dict[str, set[int]]:
    """Per symbol: the trade ids of ``venue`` stored from ``since_us`` on (for venues
    whose ids are not a range)."""
    ids: dict[str, set[int]] = defaultdict(set)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT symbol, trade_id FROM trades WHERE venue = %s AND recv_us >= %s",
            (venue, since_us),
        )
        for symbol, trade_id in cur.fetchall():
            ids[symbol].add(trade_id)
    return ids


def sequential(venue: str) -> bool:
    """Whether trades stored as ``venue`` (``binance``, ``finnhub-sim``) have contiguous
    ids; a name no venue writes is checked as if they had (the strict reading)."""
    spec = venues.stored_as(venue)
    return spec is None or spec.sequential_ids


def _events(settings: config.Settings, topic: str, timeout_ms: int = 5000) -> Iterator[Event]:
    """Every event in ``topic`` from its beginning to its end now (undecodable records
    are the drains' DLQ's to account for), per partition in offset order."""
    c = consumer(None, settings, consumer_timeout_ms=timeout_ms)
    try:
        parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        c.assign(parts)
        c.seek_to_beginning()
        end = c.end_offsets(parts)
        remaining = {tp for tp in parts if end[tp] > 0}
        while remaining:
            batch = c.poll(timeout_ms=timeout_ms, max_records=10_000)
            if not batch:
                break
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= end[tp]:
                        continue
                    try:
                        yield codec.decode(rec.value)
                    except codec.CodecError:
                        continue
                if c.position(tp) >= end[tp]:
                    remaining.discard(tp)
    finally:
        c.close()


def kafka_trade_ids(
    settings: config.Settings, topic: str, venue: str, since_us: int = 0, timeout_ms: int = 5000
) -> dict[str, Counter[int]]:
    """Every trade id of ``venue`` received at or after ``since_us`` in ``topic``, with
    how often it appears."""
    ids: dict[str, Counter[int]] = defaultdict(Counter)
    for ev in _events(settings, topic, timeout_ms):
        if isinstance(ev, Trade) and ev.venue == venue and ev.recv_us >= since_us:
            ids[ev.symbol][ev.trade_id] += 1
    return ids


def verify_trades(
    conn, settings: config.Settings, venue: str, topic: str, since_us: int = 0
) -> Verdict:
    """Trades received since ``since_us`` (e.g. the start of a run): stored without holes,
    in Kafka once each (sequential ids); or each id in Kafka stored (other venues)."""
    stored = stored_ranges(conn, venue, since_us)
    in_kafka = kafka_trade_ids(settings, topic, venue, since_us)
    contiguous = sequential(venue)
    kept = {} if contiguous else stored_ids(conn, venue, since_us)
    verdict = Verdict()
    for symbol in sorted(set(stored) | set(in_kafka)):
        n, lo, hi = stored.get(symbol, (0, 0, -1))
        ids = in_kafka.get(symbol, Counter())
        check = SymbolCheck(symbol, n, lo, hi, sequential=contiguous)
        check.in_kafka = len(ids)
        check.duplicates_in_kafka = sum(c - 1 for c in ids.values() if c > 1)
        if contiguous:
            check.missing_from_store = sum(1 for i in ids if not lo <= i <= hi)
        else:
            check.missing_from_store = len(set(ids) - kept.get(symbol, set()))
        verdict.symbols.append(check)
    return verdict


@dataclass
class BookCheck:
    """Books of one venue since a point in time: the snapshots Kafka holds against those
    stored (each (symbol, event_us) once), and deltas that do not follow their book's
    previous event (``seq``), which would leave a consumer's book wrong."""

    books: int = 0
    snapshots_in_kafka: int = 0
    deltas_in_kafka: int = 0
    stored: int = 0
    missing_from_store: int = 0
    seq_breaks: int = 0

    @property
    def problems(self) -> list[str]:
        out = []
        if self.missing_from_store:
            out.append(f"{self.missing_from_store} book snapshots in Kafka but not stored")
        if self.seq_breaks:
            out.append(f"{self.seq_breaks} book deltas out of sequence in Kafka")
        return out


def verify_books(
    conn, settings: config.Settings, venue: str, topic: str, since_us: int = 0
) -> BookCheck:
    """Every book snapshot of ``venue`` received since ``since_us`` stored once, and
    every delta carrying its book's previous ``seq`` + 1."""
    check = BookCheck()
    keys: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for ev in _events(settings, topic):
        if not isinstance(ev, BookUpdate) or ev.venue != venue or ev.recv_us < since_us:
            continue
        if ev.kind == "snapshot":
            check.snapshots_in_kafka += 1
            keys.add((ev.symbol, ev.event_us))
        else:
            check.deltas_in_kafka += 1
            if ev.symbol in last and ev.seq != last[ev.symbol] + 1:
                check.seq_breaks += 1
        last[ev.symbol] = ev.seq
    check.books = len(last)
    if keys:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT symbol, event_us FROM book_snapshots WHERE venue = %s AND recv_us >= %s",
                (venue, since_us),
            )
            stored = set(cur.fetchall())
        check.stored = len(stored)
        check.missing_from_store = len(keys - stored)
    return check
