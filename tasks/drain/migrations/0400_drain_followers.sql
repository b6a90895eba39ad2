-- Which run of a following drain (a scheduled run that keeps reading until a newer run
-- takes over) is the newest: one row per consumer, generation grows by one with every
-- take-over (tasks/drain/loop.py). Only liveness rides on it: the offsets stored with
-- the data keep every write exactly once whichever runs overlap.
CREATE TABLE drain_followers (
    consumer   text        PRIMARY KEY,
    generation bigint      NOT NULL CHECK (generation > 0),
    taken_at   timestamptz NOT NULL DEFAULT now()
);
