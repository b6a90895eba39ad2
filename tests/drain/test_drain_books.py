"""Order-book snapshots through the price drain's batch and sink, exactly once.

PostgreSQL only: records are built the way Kafka hands them to the drain (topic,
partition, offset, value) and written with ``PostgresSink.write``, as the loop does. The
delta shortcut's agreement with the codec needs no service at all. The same path through
Kafka is ``test_books_topic_is_drained_through_kafka`` (needs the broker).
"""

from __future__ import annotations

import contextlib
import uuid
from decimal import Decimal as D
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.core.codec import CodecError, decode, encode, is_book_delta
from tasks.core.events import BookUpdate
from tasks.core.pg import connect
from tasks.core.topics import BOOKS
from tasks.drain.migrate import migrate
from tasks.drain.postgres import PostgresSink, PriceBatch, book_line
from tests.drain.support import drain_prices_now, pg_schema, publish, run_crashing, trades

T0 = 1_790_000_040_000_000  # on a minute boundary, in the past


def book(kind: str, seq: int, at_s: float, bids, asks, symbol: str = "BTC-USDT") -> BookUpdate:
    levels = [tuple((D(p), D(q)) for p, q in side) for side in (bids, asks)]
    event = T0 + int(at_s * 1_000_000)
    return BookUpdate("binance", symbol, kind, seq, 3, *levels, event, event + 700)


SNAP_A = book("snapshot", 1, 10, [("100.00", "1"), ("99.95", "2")], [("100.10", "3")])
DELTA = book("delta", 2, 11, [("99.95", "0")], [("100.20", "0.5")])
SNAP_B = book("snapshot", 3, 40, [("100.20", "0.12345678")], [("100.30", "2"), ("100.9", "6")])


def records(values: list[bytes], topic: str = BOOKS, partition: int = 0, first: int = 0):
    return [
        SimpleNamespace(topic=topic, partition=partition, offset=first + i, value=v)
        for i, v in enumerate(values)
    ]


def batch_of(recs) -> tuple[PriceBatch, list]:
    batch = PriceBatch()
    return batch, batch.add(recs[0].topic, recs[0].partition, recs)


@pytest.fixture
def schema(postgres):
    with pg_schema(postgres.pg_dsn) as name:
        yield name


def stored(dsn: str, schema: str) -> list[tuple]:
    with contextlib.closing(connect(dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT venue, symbol, event_us, seq, depth, recv_us, bid_prices, bid_qtys,"
            " ask_prices, ask_qtys FROM book_snapshots ORDER BY event_us"
        )
        return cur.fetchall()


def test_the_migration_applies_twice_harmlessly(postgres, schema):
    assert migrate(postgres.pg_dsn, schema) == []
    with contextlib.closing(connect(postgres.pg_dsn, schema)) as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM schema_migrations WHERE version = 700")
        assert cur.fetchall() == [(700,)]
        cur.execute("SELECT to_regclass('book_snapshots'), to_regclass('book_minutes')")
        assert None not in cur.fetchone()


def test_snapshots_are_stored_once_and_offsets_advance(postgres, schema):
    sink = PostgresSink(postgres.pg_dsn, schema, retry_seconds=10)
    consumer = f"test-books-{uuid.uuid4().hex[:8]}"
    recs = records([encode(SNAP_A), encode(DELTA), encode(SNAP_B)])
    try:
        batch, rejects = batch_of(recs)
        assert rejects == [] and len(batch.books) == 2 and batch.skipped == 1
        out = sink.write(consumer, batch, {(BOOKS, 0): (None, 3)})
        assert out.rows == {"book_snapshots": 2} and out.skipped == {"book_deltas": 1}
        assert sink.stored_offsets(consumer, [BOOKS]) == {(BOOKS, 0): 3}
        first = stored(postgres.pg_dsn, schema)
        assert first == [
            ("binance", "BTC-USDT", SNAP_A.event_us, 1, 3, SNAP_A.event_us + 700,
             [D("100.00"), D("99.95")], [D("1"), D("2")], [D("100.10")], [D("3")]),
            ("binance", "BTC-USDT", SNAP_B.event_us, 3, 3, SNAP_B.event_us + 700,
             [D("100.20")], [D("0.12345678")], [D("100.30"), D("100.9")], [D("2"), D("6")]),
        ]  # fmt: skip

        # The same batch again (an ambiguous commit retried): the fence says it is stored.
        again = sink.write(consumer, batch_of(recs)[0], {(BOOKS, 0): (None, 3)})
        assert again.rows == {} and again.duplicates["book_snapshots"] == 2
        # The same snapshots replayed at later offsets: the key keeps one row each, the first.
        replay = [encode(SNAP_A), encode(book("snapshot", 9, 40, [("1", "1")], [("2", "1")]))]
        out = sink.write(consumer, batch_of(records(replay, first=3))[0], {(BOOKS, 0): (3, 5)})
        assert out.rows == {"book_snapshots": 0} and out.duplicates == {"book_snapshots": 2}
        assert sink.stored_offsets(consumer, [BOOKS]) == {(BOOKS, 0): 5}
        assert stored(postgres.pg_dsn, schema) == first
    finally:
        sink.close()


def test_a_batch_of_deltas_only_advances_the_offsets(postgres, schema):
    sink = PostgresSink(postgres.pg_dsn, schema, retry_seconds=10)
    consumer = f"test-books-{uuid.uuid4().hex[:8]}"
    try:
        batch, rejects = batch_of(records([encode(DELTA)] * 4))
        assert rejects == [] and len(batch) == 0 and batch.skipped == 4
        out = sink.write(consumer, batch, {(BOOKS, 0): (None, 4)})
        assert out.rows == {} and out.skipped == {"book_deltas": 4}
        assert sink.stored_offsets(consumer, [BOOKS]) == {(BOOKS, 0): 4}
        assert stored(postgres.pg_dsn, schema) == []
    finally:
        sink.close()


def _wire(event: BookUpdate, **changes: str) -> bytes:
    """A book message as encode writes it, with some fields' JSON text replaced."""
    text = encode(event).decode()
    for name, value in changes.items():
        head, sep, rest = text.partition(f'"{name}":')
        depth = end = 0
        while end < len(rest):  # to the end of this field's value
            depth += (rest[end] in "[{") - (rest[end] in "]}")
            if depth < 0 or (depth == 0 and rest[end] == ","):
                break
            end += 1
        text = head + sep + value + rest[end:]
    return text.encode()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_wire(SNAP_A, asks='[["99.99","1"]]'), "book: crossed snapshot"),
        (_wire(SNAP_A, bids='[["99.95","2"],["100.00","1"]]'), "book: snapshot levels not best"),
        (_wire(SNAP_A, bids='[["100.00","0"]]'), "book: a snapshot level with quantity 0"),
        (_wire(SNAP_A, depth="1"), "book: more levels than depth 1"),
        (_wire(SNAP_A, kind='"full"'), "kind: expected one of"),
        (_wire(DELTA, venue='""'), "venue: expected a non-empty string"),  # not the opening
        (_wire(DELTA, venue='"bin\\u0061nce"', bids='[["-1","0"]]'), "bids price: must be"),
        (b'{"v":1,"t":"book","venue":"binance"', "not JSON"),
    ],
)
def test_malformed_book_records_are_rejected_with_a_reason(value, reason):
    batch, rejects = batch_of(records([value]))
    assert len(batch) == 0 and batch.skipped == 0
    assert len(rejects) == 1 and rejects[0][1].startswith(reason), rejects


def test_a_delta_malformed_after_its_opening_is_skipped_with_the_deltas():
    """The price drain stores no delta, so it does not validate them: a message with a
    delta's opening is skipped (counted) whatever follows; it is never a snapshot (the
    property below). Readers of deltas validate them."""
    value = _wire(DELTA, bids='[["-1","0"]]')
    with pytest.raises(CodecError):
        decode(value)
    batch, rejects = batch_of(records([value]))
    assert rejects == [] and batch.skipped == 1


def test_a_delta_written_otherwise_takes_the_full_path_and_is_skipped():
    value = encode(DELTA).replace(b'{"v":1,"t":"book",', b'{"t":"book","v":1,')
    assert not is_book_delta(value)
    batch, rejects = batch_of(records([value]))
    assert rejects == [] and batch.skipped == 1 and len(batch) == 0


def test_book_line_is_the_table_row_in_copy_text():
    assert book_line(SNAP_A) == (
        b"binance\tBTC-USDT\t%d\t1\t3\t%d\t{100.00,99.95}\t{1,2}\t{100.10}\t{3}"
        % (SNAP_A.event_us, SNAP_A.event_us + 700)
    )


# --- the delta shortcut agrees with the codec ----------------------------------------
prices = st.decimals(D("0.00000001"), D("99999"), places=8, allow_nan=False)
levels = st.lists(st.tuples(prices, prices), max_size=4, unique_by=lambda lv: lv[0])
events = st.builds(
    BookUpdate, st.sampled_from(["binance", "kraken", 'a"b', "c\\d", "é"]),
    st.sampled_from(["BTC-USDT", "ETH-USD"]), st.sampled_from(["delta", "snapshot"]),
    st.integers(0, 10**12), st.just(4), levels.map(tuple), levels.map(tuple),
    st.just(T0), st.just(T0 + 1),
)  # fmt: skip
MUTATIONS = st.sampled_from([*b'0123456789.-"\\:,{}[]aktvx ', *b"kind", 0xC3])
EDITS = st.lists(
    st.tuples(st.integers(0, 300), st.integers(0, 3), st.lists(MUTATIONS, max_size=6)),
    max_size=3,
)


@settings(max_examples=1000, deadline=None)
@given(events, EDITS)
def test_what_the_shortcut_skips_decodes_to_a_delta_or_not_at_all(event, edits):
    value = bytearray(encode(event))
    for at, cut, insert in edits:
        at %= len(value) + 1
        value[at : at + cut] = bytes(insert)
    value = bytes(value)
    try:
        decoded = decode(value)
    except CodecError:
        decoded = None
    if is_book_delta(value):
        assert decoded is None or (type(decoded) is BookUpdate and decoded.kind == "delta")
    if not edits and event.kind == "delta" and not set(event.venue) & {'"', "\\"}:
        assert is_book_delta(value)  # deltas as ingestion writes them take the shortcut


@pytest.mark.parametrize(
    "value",
    [
        encode(DELTA).replace(b'"recv_us"', b'"kind":"snapshot","recv_us"'),
        encode(DELTA).replace(b'"recv_us"', b'"\\u006bind":"snapshot","recv_us"'),
        encode(DELTA).replace(b'"recv_us"', b'"t":"trade","recv_us"'),
        encode(DELTA).replace(b'"recv_us"', b'"v":2,"recv_us"'),
    ],
)
def test_a_later_key_that_could_change_the_event_defeats_the_shortcut(value):
    assert not is_book_delta(value)


# --- through Kafka (needs the broker: run by CI, not by the PostgreSQL-only checks) ---
def test_books_topic_is_drained_through_kafka(kafka, postgres, schema, new_topic):
    """KAFKA: snapshots and trades published, drained with deltas skipped and counted."""
    books, trades_topic = new_topic(1), new_topic(1)
    publish(kafka, books, [SNAP_A, DELTA, SNAP_B, SNAP_A])
    publish(kafka, trades_topic, trades(10))
    consumer = f"test-books-{uuid.uuid4().hex[:8]}"
    res = drain_prices_now(kafka, schema, consumer, [trades_topic, books])
    assert res.written.rows.get("book_snapshots") == 2 and res.written.rows.get("trades") == 10
    assert res.written.skipped == {"book_deltas": 1} and res.rejects == {}
    assert [r[3] for r in stored(postgres.pg_dsn, schema)] == [1, 3]


def test_snapshots_are_stored_once_across_a_drain_killed_mid_batch(kafka, postgres, new_topic):
    """KAFKA: the drain dies after its database commit and before Kafka's (the window
    where PostgreSQL is ahead); the rerun resumes from the stored offsets and the table
    equals a clean run's, each snapshot once."""
    books = new_topic(3)
    events = []
    for i in range(900):  # 3 books, a snapshot and two deltas each step
        symbol = ("BTC-USDT", "ETH-USDT", "SOL-USDT")[i % 3]
        at = i // 3
        events.append(book("snapshot", 3 * at + 1, at, [("100", f"{i + 1}")], [("101", "1")],
                           symbol))  # fmt: skip
        events += [book("delta", 3 * at + k, at + k / 10, [("100", f"{k}")], [], symbol)
                   for k in (2, 3)]  # fmt: skip
    publish(kafka, books, events)
    with pg_schema(postgres.pg_dsn) as crashed, pg_schema(postgres.pg_dsn) as clean:
        consumer = f"test-books-{uuid.uuid4().hex[:8]}"
        code = run_crashing("prices", crashed, consumer, [books], "after_db_commit:3", 150)
        assert code == 75, "the drain should have died at the fault point"
        before = len(stored(postgres.pg_dsn, crashed))
        assert 0 < before < 900
        retry = drain_prices_now(kafka, crashed, consumer, [books], batch_size=150)
        assert retry.stopped == "caught up"
        assert retry.written.rows["book_snapshots"] == 900 - before
        single = drain_prices_now(kafka, clean, f"{consumer}-clean", [books], batch_size=150)
        assert single.written.rows["book_snapshots"] == 900
        assert single.written.skipped == {"book_deltas": 1800}
        rows = stored(postgres.pg_dsn, crashed)
        assert rows == stored(postgres.pg_dsn, clean) and len(rows) == 900
        assert len({(r[0], r[1], r[2]) for r in rows}) == 900
