-- Price history and consumed Kafka offsets (issue 5).
--
-- trades is deliberately NOT partitioned by time: PostgreSQL requires the partition key
-- in every unique index, so time partitions would make a trade's identity
-- (venue, symbol, trade_id, event_us) and a trade re-delivered with a different time
-- (e.g. a REST repair at coarser precision than the stream) would be stored twice.
-- The natural key is the correctness contract; old data is dropped with range deletes
-- on event_us (BRIN index below), and this also runs on CockroachDB.

CREATE TABLE trades (
    venue        text    NOT NULL,
    symbol       text    NOT NULL,
    venue_symbol text    NOT NULL,
    trade_id     bigint  NOT NULL,
    price        numeric NOT NULL CHECK (price > 0),
    qty          numeric NOT NULL CHECK (qty > 0),
    side         text    NOT NULL CHECK (side IN ('buy', 'sell')),
    event_us     bigint  NOT NULL,
    recv_us      bigint  NOT NULL,
    PRIMARY KEY (venue, symbol, trade_id)
);
-- Time-range queries per symbol (all venues) and per venue+symbol.
CREATE INDEX trades_symbol_time ON trades (symbol, event_us);
-- Cheap range scans by time alone (retention deletes, freshness): rows arrive roughly
-- in event-time order, which is what BRIN needs.
CREATE INDEX trades_time_brin ON trades USING brin (event_us);

-- Every top-of-book update as received; a replayed message is the same row.
CREATE TABLE quotes (
    venue        text    NOT NULL,
    symbol       text    NOT NULL,
    venue_symbol text    NOT NULL,
    update_id    bigint,
    bid_price    numeric NOT NULL,
    bid_qty      numeric NOT NULL,
    ask_price    numeric NOT NULL,
    ask_qty      numeric NOT NULL,
    event_us     bigint  NOT NULL,
    recv_us      bigint  NOT NULL,
    PRIMARY KEY (venue, symbol, event_us, recv_us)
);
CREATE INDEX quotes_symbol_time ON quotes (symbol, event_us);

-- The newest quote per venue and symbol; the drain's upsert never moves it backwards in
-- (event_us, update_id, recv_us), so a replay or a late message cannot regress it.
CREATE TABLE quotes_latest (
    venue        text    NOT NULL,
    symbol       text    NOT NULL,
    venue_symbol text    NOT NULL,
    update_id    bigint,
    bid_price    numeric NOT NULL,
    bid_qty      numeric NOT NULL,
    ask_price    numeric NOT NULL,
    ask_qty      numeric NOT NULL,
    event_us     bigint  NOT NULL,
    recv_us      bigint  NOT NULL,
    PRIMARY KEY (venue, symbol)
);

-- OHLCV per window (written by the aggregation flow, which adds its indicator columns
-- in its own migration).
CREATE TABLE candles (
    venue       text    NOT NULL,
    symbol      text    NOT NULL,
    "interval"  text    NOT NULL,
    open_us     bigint  NOT NULL,
    open        numeric NOT NULL,
    high        numeric NOT NULL,
    low         numeric NOT NULL,
    close       numeric NOT NULL,
    volume      numeric NOT NULL,
    trade_count bigint  NOT NULL,
    vwap        numeric NOT NULL,
    source      text    NOT NULL DEFAULT 'trades',
    PRIMARY KEY (venue, symbol, "interval", open_us)
);
CREATE INDEX candles_symbol_time ON candles (symbol, "interval", open_us);

-- The next Kafka offset to read, written in the same transaction as the rows it covers.
CREATE TABLE kafka_offsets (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);
