-- Which ingestion run may publish a feed (a venue into a trades topic) right now: one row
-- per feed, taken, renewed and released by tasks/ingest/lease.py. Expiry is judged by this
-- server's clock only (now()), never a host's. token grows by one with every acquisition
-- (the fencing token); a released lease keeps its row, so tokens never restart.
CREATE TABLE ingest_leases (
    feed        text        PRIMARY KEY,
    token       bigint      NOT NULL CHECK (token > 0),
    holder      text        NOT NULL,
    owner       text        NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    released_at timestamptz
);
