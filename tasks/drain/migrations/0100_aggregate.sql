-- Aggregation (issue 6): dirty-window tracking, indicators, alerts, backfill progress.
-- Applied after the drains' migrations (0001..), which create trades and candles.

-- Every statement that inserts trades records the (venue, symbol, minute) windows it
-- touched, in the same transaction, whoever inserts: live drains, gap repairs, REST
-- backfills, topic replays, late trades. The aggregate flow turns these rows into the
-- candle windows to recompute. Append-only (no unique key), so inserting never waits on
-- the aggregate, which deletes the rows it has claimed by seq. The trigger uses a
-- statement-level transition table (PostgreSQL 10+); on a database without one (e.g.
-- CockroachDB) the drain would have to insert these rows itself.
CREATE TABLE IF NOT EXISTS candle_dirty (
    seq        bigserial PRIMARY KEY,
    venue      text   NOT NULL,
    symbol     text   NOT NULL,
    minute_us  bigint NOT NULL
);

CREATE OR REPLACE FUNCTION tapeline_mark_candles_dirty() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO candle_dirty (venue, symbol, minute_us)
    SELECT DISTINCT venue, symbol, event_us - event_us % 60000000 FROM inserted_trades;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER trades_mark_candles_dirty
    AFTER INSERT ON trades
    REFERENCING NEW TABLE AS inserted_trades
    FOR EACH STATEMENT EXECUTE FUNCTION tapeline_mark_candles_dirty();

-- Windows claimed from candle_dirty, per configured interval, waiting to be final.
CREATE TABLE IF NOT EXISTS candle_pending (
    venue     text   NOT NULL,
    symbol    text   NOT NULL,
    "interval" text  NOT NULL,
    open_us   bigint NOT NULL,
    PRIMARY KEY (venue, symbol, "interval", open_us)
);

-- Indicators per candle (see tasks/indicators.py for why a table of their own).
CREATE TABLE IF NOT EXISTS candle_indicators (
    venue        text    NOT NULL,
    symbol       text    NOT NULL,
    "interval"   text    NOT NULL,
    open_us      bigint  NOT NULL,
    spec         text    NOT NULL,
    sma          numeric,
    ewma         numeric NOT NULL,
    pct_change   numeric,
    roll_min     numeric,
    roll_max     numeric,
    roll_volume  numeric,
    computed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, symbol, "interval", open_us)
);

-- Alert rules, their state, and the outbox of fired alerts (tasks/alerts.py).
CREATE TABLE IF NOT EXISTS alert_rules (
    rule_id   text PRIMARY KEY,
    venue     text    NOT NULL,
    symbol    text    NOT NULL,
    kind      text    NOT NULL CHECK (kind IN ('above', 'below', 'move')),
    level     numeric CHECK (level > 0),
    move_pct  numeric CHECK (move_pct > 0),
    window_n  integer NOT NULL DEFAULT 1 CHECK (window_n >= 1),
    "interval" text   NOT NULL DEFAULT '1m',
    enabled   boolean NOT NULL DEFAULT true,
    CHECK ((kind = 'move') = (move_pct IS NOT NULL) AND (kind <> 'move') = (level IS NOT NULL))
);

CREATE TABLE IF NOT EXISTS alert_state (
    rule_id       text PRIMARY KEY REFERENCES alert_rules (rule_id) ON DELETE CASCADE,
    active        boolean     NOT NULL,
    last_open_us  bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS alerts (
    alert_id      text PRIMARY KEY,
    rule_id       text        NOT NULL,
    venue         text        NOT NULL,
    symbol        text        NOT NULL,
    open_us       bigint      NOT NULL,
    payload       text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (created_at) WHERE published_at IS NULL;

-- REST backfill pages already published to Kafka (flows/backfill.py): a rerun skips them.
CREATE TABLE IF NOT EXISTS backfill_pages (
    venue       text   NOT NULL,
    symbol      text   NOT NULL,
    kind        text   NOT NULL,  -- 'trades' or 'klines:<interval>'
    start_us    bigint NOT NULL,
    end_us      bigint NOT NULL,
    rows        integer NOT NULL,
    first_id    bigint,
    last_id     bigint,
    done_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, symbol, kind, start_us, end_us)
);
