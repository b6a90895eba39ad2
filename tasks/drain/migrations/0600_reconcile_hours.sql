-- What the reconcile flow (flows/reconcile.py) found per (venue, symbol, UTC hour) when
-- it last compared stored trades with the venue's REST history: counts, id ranges and
-- traded volume on both sides, trades the venue has that were not stored (missing, as
-- found, before this check's refill), stored trades the venue does not list (extra),
-- and how many of the missing the drain had stored when the check ended (refilled).
-- The exporter turns the newest day per venue into completeness gauges and the alert
-- TapelineVenueIncomplete reads them. A rerun of an hour replaces its row.
CREATE TABLE reconcile_hours (
    venue           text        NOT NULL,
    symbol          text        NOT NULL,
    hour_us         bigint      NOT NULL CHECK (hour_us % 3600000000 = 0),
    venue_trades    bigint      NOT NULL CHECK (venue_trades >= 0),
    stored_trades   bigint      NOT NULL CHECK (stored_trades >= 0),
    missing         bigint      NOT NULL CHECK (missing >= 0),
    extra           bigint      NOT NULL CHECK (extra >= 0),
    refilled        bigint      NOT NULL DEFAULT 0 CHECK (refilled >= 0),
    venue_first_id  bigint,
    venue_last_id   bigint,
    stored_first_id bigint,
    stored_last_id  bigint,
    venue_volume    numeric     NOT NULL,
    stored_volume   numeric     NOT NULL,
    checked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (venue, symbol, hour_us)
);
CREATE INDEX reconcile_hours_venue_hour ON reconcile_hours (venue, hour_us);
