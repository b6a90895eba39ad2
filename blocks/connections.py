"""Prefect blocks for the platform's connections.

Deployments name these blocks instead of carrying URLs; passwords are ``SecretStr`` so
the Prefect UI and logs never show them. Each block turns into the same environment
variables ``tasks.core.config`` reads, so a flow resolves its settings one way whether they
came from a block or from the environment.
"""

from __future__ import annotations

from urllib.parse import quote

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class KafkaCluster(Block):
    """A Kafka cluster Tapeline produces to and consumes from."""

    _block_type_name = "Tapeline Kafka Cluster"
    _block_type_slug = "tapeline-kafka-cluster"

    bootstrap_servers: str = Field(
        default="127.0.0.1:19092", description="Comma-separated host:port list."
    )
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str = Field(default="", description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512.")
    username: str = ""
    password: SecretStr = SecretStr("")
    partitions: int = Field(default=6, description="Partitions for topics Tapeline creates.")
    replication: int = Field(default=1, description="Replication factor for new topics.")

    def env(self) -> dict[str, str]:
        return {
            "TAPELINE_KAFKA_BOOTSTRAP": self.bootstrap_servers,
            "TAPELINE_KAFKA_SECURITY_PROTOCOL": self.security_protocol,
            "TAPELINE_KAFKA_SASL_MECHANISM": self.sasl_mechanism,
            "TAPELINE_KAFKA_USERNAME": self.username,
            "TAPELINE_KAFKA_PASSWORD": self.password.get_secret_value(),
            "TAPELINE_TOPIC_PARTITIONS": str(self.partitions),
            "TAPELINE_TOPIC_REPLICATION": str(self.replication),
        }


class PostgresConnection(Block):
    """The PostgreSQL (or CockroachDB) database holding price history, and the role flows
    use there: the writer (rows only, no DDL; ``python -m blocks register`` saves it). A
    flow given this block does everything as that role, so credentials of two databases
    never mix; migrations are the owner's (``python -m tasks.drain.migrate``)."""

    _block_type_name = "Tapeline PostgreSQL"
    _block_type_slug = "tapeline-postgres"

    host: str = "127.0.0.1"
    port: int = 15432
    database: str = "tapeline"
    user: str = "tapeline_writer"
    password: SecretStr = SecretStr("")
    sslmode: str = Field(default="prefer", description="libpq sslmode.")

    def env(self) -> dict[str, str]:
        pw = quote(self.password.get_secret_value(), safe="")
        dsn = (
            f"postgresql://{quote(self.user, safe='')}:{pw}@{self.host}:{self.port}/"
            f"{self.database}?sslmode={self.sslmode}"
        )
        return {
            "TAPELINE_PG_DSN": dsn,
            "TAPELINE_PG_WRITER_DSN": dsn,
            "TAPELINE_PG_READER_DSN": dsn,
        }


class MongoConnection(Block):
    """The MongoDB (or FerretDB) database holding user transactions and wallets."""

    _block_type_name = "Tapeline MongoDB"
    _block_type_slug = "tapeline-mongo"

    hosts: str = Field(default="127.0.0.1:27117", description="Comma-separated host:port.")
    database: str = "tapeline"
    username: str = ""
    password: SecretStr = SecretStr("")
    options: str = Field(default="", description="URI options, e.g. authSource=admin&tls=true")

    def env(self) -> dict[str, str]:
        auth = ""
        if self.username:
            pw = quote(self.password.get_secret_value(), safe="")
            auth = f"{quote(self.username, safe='')}:{pw}@"
        query = f"?{self.options}" if self.options else ""
        return {
            "TAPELINE_MONGO_URL": f"mongodb://{auth}{self.hosts}/{query}",
            "TAPELINE_MONGO_DB": self.database,
        }


class VenueFeed(Block):
    """Where a venue's feeds live. Point both URLs at the simulator to run offline."""

    _block_type_name = "Tapeline Venue Feed"
    _block_type_slug = "tapeline-venue-feed"

    venue: str = Field(
        description="binance, binanceus, coinbase, kraken, deribit or finnhub (its token is"
        " the Secret block finnhub-token or TAPELINE_FINNHUB_TOKEN, never this block)."
    )
    ws_url: str = Field(default="", description="WebSocket base URL; empty: the venue's own.")
    rest_url: str = Field(default="", description="REST base URL; empty: the venue's own.")
    symbols: list[str] = Field(default_factory=lambda: ["BTC-USDT", "ETH-USDT"])
    shard_size: int = Field(default=200, description="Symbols per WebSocket connection.")


BLOCKS: tuple[type[Block], ...] = (KafkaCluster, PostgresConnection, MongoConnection, VenueFeed)
