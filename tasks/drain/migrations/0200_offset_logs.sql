-- Which log a consumer's stored offsets belong to: "<cluster id>/<topic id>". An offset
-- means nothing on a recreated topic or another cluster, so a drain compares this with
-- what the broker serves before it resumes (tasks/drain/loop.py).
CREATE TABLE kafka_logs (
    consumer   text        NOT NULL,
    topic      text        NOT NULL,
    log_id     text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic)
);
