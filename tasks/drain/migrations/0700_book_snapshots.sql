-- Order-book snapshots (drain-prices stores the kind "snapshot" events of market.books.raw;
-- deltas stay on Kafka) and their per-minute aggregates (aggregate flow,
-- tasks/analytics/books.py).
--
-- Shape: one row per snapshot, each side as two numeric arrays, best level first (bids
-- high to low, asks low to high, as the codec guarantees), rather than one row per level.
-- Measured by bench/bench_books.py (50,000 snapshots of 5 books, 20 levels a side,
-- 8-decimal prices and quantities, staged COPY + INSERT as the drain does, PostgreSQL 15
-- on a busy 2-core machine):
--                   stored/s           on disk            book at T    1 h spread history
--   snapshot rows:  9,272 snapshots    59 MiB, 1.2 KiB    0.40 ms      150 ms (3,600 rows)
--   level rows:       788 snapshots   339 MiB, 7.1 KiB    0.56 ms      242 ms
--                    (31,503 levels)
-- A level row repeats the book's key and carries a tuple header and an index entry for
-- every level: ~6x the disk and ~12x slower to store per snapshot (and twice the Python
-- CPU to build its COPY lines), and both reads are slower (the book at T is one index
-- probe and one row here; the hour's history reads one row per snapshot, not 40). What level rows buy, filtering
-- levels by price in an index, no query here needs: depth within a band is a sum over
-- at most 100 array elements of one row.
--
-- Key: at most one stored snapshot per book per microsecond; a replayed or repeated
-- snapshot is the same row and the first stored wins (the drain's ON CONFLICT DO NOTHING).
-- The key is also the index of "the book at T": the newest row with event_us <= T of one
-- (venue, symbol) is one backward probe of it.
CREATE TABLE book_snapshots (
    venue      text      NOT NULL,
    symbol     text      NOT NULL,
    event_us   bigint    NOT NULL,
    seq        bigint    NOT NULL CHECK (seq >= 0),
    depth      smallint  NOT NULL CHECK (depth BETWEEN 1 AND 100),
    recv_us    bigint    NOT NULL,
    bid_prices numeric[] NOT NULL,
    bid_qtys   numeric[] NOT NULL,
    ask_prices numeric[] NOT NULL,
    ask_qtys   numeric[] NOT NULL,
    CHECK (cardinality(bid_prices) = cardinality(bid_qtys)
           AND cardinality(ask_prices) = cardinality(ask_qtys)
           AND cardinality(bid_prices) <= depth AND cardinality(ask_prices) <= depth),
    PRIMARY KEY (venue, symbol, event_us)
);
-- Range scans by time alone (retention deletes, the minute aggregation of all books):
-- snapshots arrive roughly in event-time order, which is what BRIN needs.
CREATE INDEX book_snapshots_time_brin ON book_snapshots USING brin (event_us);

-- Every statement that inserts snapshots marks the (venue, symbol, minute) it touched,
-- in the same transaction (the same mechanism as candle_dirty in 0100): the aggregate
-- flow recomputes those minutes once they are final, so a late or replayed snapshot
-- recomputes its minute. Append-only; the aggregate deletes the rows it claims.
CREATE TABLE book_minute_dirty (
    seq        bigserial PRIMARY KEY,
    venue      text   NOT NULL,
    symbol     text   NOT NULL,
    minute_us  bigint NOT NULL
);

CREATE OR REPLACE FUNCTION tapeline_mark_book_minutes_dirty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO book_minute_dirty (venue, symbol, minute_us)
    SELECT DISTINCT venue, symbol, event_us - event_us % 60000000 FROM inserted_books;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER book_snapshots_mark_minutes_dirty
    AFTER INSERT ON book_snapshots
    REFERENCING NEW TABLE AS inserted_books
    FOR EACH STATEMENT EXECUTE FUNCTION tapeline_mark_book_minutes_dirty();

-- Per closed minute (event time) and book, from the two-sided snapshots in it, for each
-- band of +-band_bps basis points around each snapshot's mid: mean spread, mean mid, the
-- minute's last mid, the mean quantity within the band per side, and the imbalance
-- (bid - ask) / (bid + ask) of those (NULL when both are 0). Recomputing a minute gives
-- the same row (upsert on the key).
CREATE TABLE book_minutes (
    venue       text    NOT NULL,
    symbol      text    NOT NULL,
    minute_us   bigint  NOT NULL CHECK (minute_us % 60000000 = 0),
    band_bps    integer NOT NULL CHECK (band_bps BETWEEN 1 AND 10000),
    snapshots   integer NOT NULL CHECK (snapshots > 0),
    mean_spread numeric NOT NULL,
    mean_mid    numeric NOT NULL,
    last_mid    numeric NOT NULL,
    bid_depth   numeric NOT NULL,
    ask_depth   numeric NOT NULL,
    imbalance   numeric CHECK (imbalance BETWEEN -1 AND 1),
    PRIMARY KEY (venue, symbol, minute_us, band_bps)
);
