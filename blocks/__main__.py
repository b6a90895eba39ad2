"""Register Tapeline's block types and save the default documents for an environment.

    python -m blocks register            # types + documents named 'local' from the env
    python -m blocks register --name prod

The documents are built from the current settings (env vars, local defaults), so the
same command serves the local stack, the compose stack and a real cluster.
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import unquote, urlsplit

from blocks.connections import BLOCKS, KafkaCluster, MongoConnection, PostgresConnection, VenueFeed
from tasks.core import config


def documents(s: config.Settings) -> list:
    """A URL's userinfo is percent-encoded and the blocks hold plain values (they encode
    when they build a URL again): decode here, or a password with ``@ : / % # ?`` breaks."""
    pg = urlsplit(s.pg_writer_dsn)  # flows' role: the owner's password stays out of Prefect
    mongo = urlsplit(s.mongo_url)
    sim = urlsplit(s.simulator_url)
    return [
        KafkaCluster(
            bootstrap_servers=",".join(s.kafka.bootstrap),
            security_protocol=s.kafka.security_protocol,
            sasl_mechanism=s.kafka.sasl_mechanism,
            username=s.kafka.username,
            password=s.kafka.password,
            partitions=s.topics.partitions,
            replication=s.topics.replication,
        ),
        PostgresConnection(
            host=pg.hostname or "127.0.0.1",
            port=pg.port or 5432,
            database=pg.path.lstrip("/") or "tapeline",
            user=unquote(pg.username or "tapeline_writer"),
            password=unquote(pg.password or ""),
        ),
        MongoConnection(
            hosts=mongo.netloc.rpartition("@")[2],
            database=s.mongo_db,
            username=unquote(mongo.username or ""),
            password=unquote(mongo.password or ""),
            options=mongo.query,
        ),
        VenueFeed(
            venue="binance",
            ws_url=f"ws://{sim.netloc}",
            rest_url=f"{sim.scheme}://{sim.netloc}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocks", description=__doc__)
    parser.add_argument("command", choices=["register"])
    parser.add_argument("--name", default="local", help="document name (default: local)")
    args = parser.parse_args(argv)
    for cls in BLOCKS:
        cls.register_type_and_schema()
    for doc in documents(config.load()):
        name = "simulator" if isinstance(doc, VenueFeed) else args.name
        doc.save(name, overwrite=True)
        print(f"saved {doc._block_type_slug}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
