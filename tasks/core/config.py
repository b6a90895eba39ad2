"""Connection settings, read in one place.

Every setting comes from an environment variable with a local default that matches the
no-Docker stack (``python -m stack up``). Deployments override them with Prefect blocks
(see ``blocks/``), which resolve to the same ``Settings``. Validation names the variable
that is wrong, so a typo fails at start-up rather than as a timeout deep in a flow.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, urlsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DEFAULTS: dict[str, str] = {
    "TAPELINE_HOME": str(PROJECT_ROOT / ".tapeline"),
    "TAPELINE_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
    "TAPELINE_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
    "TAPELINE_KAFKA_SASL_MECHANISM": "",
    "TAPELINE_KAFKA_USERNAME": "",
    "TAPELINE_KAFKA_PASSWORD": "",
    # How long a produced record may wait for the broker's ack before it is reported
    # failed (then handed back to gap repair or sent again, never dropped).
    "TAPELINE_KAFKA_DELIVERY_TIMEOUT_MS": "120000",
    # KRaft nodes (each broker and controller) ``python -m stack up`` runs, on consecutive
    # port pairs from the first bootstrap address; a one-address bootstrap lists them all.
    "TAPELINE_KAFKA_NODES": "1",
    "TAPELINE_TOPIC_PARTITIONS": "6",
    # Empty: the node count, at most 3 (``min.insync.replicas`` is then 2 where it can be).
    "TAPELINE_TOPIC_REPLICATION": "",
    "TAPELINE_TOPIC_RETENTION_HOURS": "168",
    # The owner: migrations. Empty: the local stack's owner ``tapeline`` on 127.0.0.1:15432,
    # with a password made once in $TAPELINE_HOME/secrets/pg-owner (``local_secret``).
    "TAPELINE_PG_DSN": "",
    # Roles per purpose: TAPELINE_PG_DSN (the owner) migrates; flows write as the writer
    # and dashboards, the exporter and reports read as the reader. Empty: the local
    # stack's own roles when TAPELINE_PG_DSN is empty too, else TAPELINE_PG_DSN.
    "TAPELINE_PG_WRITER_DSN": "",
    "TAPELINE_PG_READER_DSN": "",
    "TAPELINE_MONGO_URL": "mongodb://127.0.0.1:27117/",
    "TAPELINE_MONGO_DB": "tapeline",
    "TAPELINE_METRICS_PORT": "9108",
    # Where listeners the platform starts bind: loopback unless a container network needs
    # them reachable (compose sets 0.0.0.0 inside its network; host ports stay loopback).
    "TAPELINE_LISTEN_HOST": "127.0.0.1",
    "TAPELINE_PUSHGATEWAY_URL": "",
    "TAPELINE_SIMULATOR_URL": "http://127.0.0.1:18765",
    "TAPELINE_SIMULATOR_RATE": "200",
    "TAPELINE_CODE_DIR": str(PROJECT_ROOT),
    "TAPELINE_CACHE": str(Path.home() / ".cache" / "tapeline"),
    "TAPELINE_DRAIN_FAULT": "",
    "PREFECT_API_URL": "http://127.0.0.1:14200/api",
    # Basic auth of the Prefect API, ``user:password``. Empty: the local stack's own,
    # generated once per $TAPELINE_HOME (see ``prefect_auth``).
    "PREFECT_API_AUTH_STRING": "",
    # Venues' API tokens (``VenueSpec.credential``; ``venue_secret``). Empty: a Prefect
    # Secret block of the credential's name (``blocks.venue_credential``).
    "TAPELINE_FINNHUB_TOKEN": "",
}
# Variables whose values are secrets: never printed, logged or shown in a repr.
SECRET_VARS = (
    "TAPELINE_KAFKA_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "PGPASSWORD",
    "TAPELINE_FINNHUB_TOKEN",
)


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the setting."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: list[str]
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    delivery_timeout_ms: int = 120_000
    nodes: int = 1  # of the local stack (``TAPELINE_KAFKA_NODES``)

    def client_kwargs(self) -> dict[str, object]:
        """kafka-python keyword arguments shared by producers, consumers and admin."""
        kw: dict[str, object] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        return kw


@dataclass(frozen=True)
class TopicSettings:
    partitions: int
    replication: int
    retention_hours: int


@dataclass(frozen=True)
class Settings:
    home: Path
    kafka: KafkaSettings
    topics: TopicSettings
    pg_dsn: str  # the owner: migrations
    mongo_url: str
    mongo_db: str
    metrics_port: int
    simulator_url: str
    prefect_api_url: str
    pushgateway_url: str = ""  # empty: drain runs push no metrics
    simulator_rate: int = 200  # trades/s per symbol of the platform's simulator
    code_dir: Path = PROJECT_ROOT  # where workers find the code (prefect.yaml pull step)
    prefect_auth: str = field(default="", repr=False)  # ``user:password`` for the API
    listen_host: str = "127.0.0.1"  # the address metrics endpoints bind
    pg_writer_dsn: str = ""  # flows' reads and writes: no DDL (empty: pg_dsn)
    pg_reader_dsn: str = ""  # read-only (empty: pg_dsn)

    def __post_init__(self) -> None:
        for name in ("pg_writer_dsn", "pg_reader_dsn"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.pg_dsn)

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        """Connection URLs with their passwords masked: a Settings object ends up in
        tracebacks, task-run inputs and log lines, and must not carry a secret there."""
        return (
            f"Settings(home={str(self.home)!r}, kafka={self.kafka!r},"
            f" pg_dsn={redact(self.pg_dsn)!r}, pg_writer_dsn={redact(self.pg_writer_dsn)!r},"
            f" pg_reader_dsn={redact(self.pg_reader_dsn)!r}, mongo_url={redact(self.mongo_url)!r},"
            f" mongo_db={self.mongo_db!r}, prefect_api_url={self.prefect_api_url!r})"
        )

    __str__ = __repr__

    def prefect_env(self) -> dict[str, str]:
        """What a Prefect client (CLI, worker, flow-run process) needs to reach the API."""
        env = {"PREFECT_API_URL": self.prefect_api_url}
        if self.prefect_auth:
            env["PREFECT_API_AUTH_STRING"] = self.prefect_auth
        return env


def _get(env: dict[str, str], name: str) -> str:
    value = env.get(name, DEFAULTS[name]).strip()
    return value


def _int(env: dict[str, str], name: str, low: int, high: int) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected {low}..{high}")
    return value


def _url(env: dict[str, str], name: str, schemes: tuple[str, ...]) -> str:
    raw = _get(env, name)
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{name}={redact(raw)!r}: expected a {'/'.join(schemes)} URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{name}={redact(raw)!r}: malformed port") from None
    return raw


def redact(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (for display)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, _ = parts.netloc.rpartition("@")[0].partition(":")
    return parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}").geturl()


RESERVED = "@:/%#?"


def new_secret() -> str:
    """32 random URL-safe characters with each URL-reserved one (``@ : / % # ?``) at a
    random place: every local stack proves that such passwords work end to end (URLs,
    blocks, basic auth), not only the tests that choose one."""
    chars = list(secrets.token_urlsafe(24))
    for c in RESERVED:
        chars.insert(secrets.randbelow(len(chars) + 1), c)
    return "".join(chars)


def local_secret(home: Path, name: str) -> str:
    """A random secret of the local stack, made once per ``home`` (``home/secrets/name``,
    mode 0600; the first process to write it wins) and read back after that."""
    path = home / "secrets" / name
    with_umask = os.umask(0o077)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as f:
                f.write(new_secret() + "\n")
        except FileExistsError:
            pass
    finally:
        os.umask(with_umask)
    value = path.read_text().strip()
    if not value:
        raise ConfigError(f"{path}: empty")
    return value


# The local stack's roles (created by ``stack.services.Postgres``; granted per schema by
# ``tasks.drain.migrate``).
WRITER_ROLE, READER_ROLE = "tapeline_writer", "tapeline_reader"


def _role_dsn(env: dict[str, str], name: str, role: str, home: Path, owner: str) -> str:
    """The DSN of one role: given, the local stack's role, or the owner's."""
    given = _get(env, name)
    if given:
        return _url(env, name, ("postgresql", "postgres"))
    if _get(env, "TAPELINE_PG_DSN"):
        return owner  # a database set up elsewhere: one role unless told otherwise
    return _local_dsn(role, local_secret(home, f"pg-{role}"))


LOCAL_PG = "127.0.0.1:15432/tapeline"


def _local_dsn(user: str, password: str) -> str:
    return f"postgresql://{user}:{quote(password, safe='')}@{LOCAL_PG}"


def _owner_dsn(env: dict[str, str], home: Path) -> str:
    """``TAPELINE_PG_DSN``, else the local stack's owner. A data folder made before the
    owner's password was random keeps the old one (``tapeline``): the security sweep calls
    it weak; ``python -m stack down --purge`` starts over with a random one."""
    if _get(env, "TAPELINE_PG_DSN"):
        return _url(env, "TAPELINE_PG_DSN", ("postgresql", "postgres"))
    secret = home / "secrets" / "pg-owner"
    if not secret.exists() and (home / "postgres" / "data" / "PG_VERSION").exists():
        return _local_dsn("tapeline", "tapeline")
    return _local_dsn("tapeline", local_secret(home, "pg-owner"))


def prefect_auth(env: dict[str, str], home: Path) -> str:
    """``PREFECT_API_AUTH_STRING`` if set; else the local stack's own credentials, made once
    per ``home`` (``local_secret``: ``home/secrets/prefect-api``) so that the local
    Prefect server never runs without authentication and no credential is in the repo."""
    given = _get(env, "PREFECT_API_AUTH_STRING")
    if not given and env.get("PREFECT_API_KEY"):
        return ""  # Prefect Cloud: its API key authenticates (an auth string would win)
    if given:
        if ":" not in given:
            raise ConfigError("PREFECT_API_AUTH_STRING: expected user:password")
        return given
    return f"tapeline:{local_secret(home, 'prefect-api')}"


def _bootstrap(env: dict[str, str], nodes: int) -> list[str]:
    """The bootstrap addresses; with several local nodes and one address given, every
    node's (``host:port``, ``host:port+2``, ...), so a client starts with any node down."""
    name = "TAPELINE_KAFKA_BOOTSTRAP"
    servers = [s.strip() for s in _get(env, name).split(",") if s.strip()]
    if not servers:
        raise ConfigError(f"{name}: empty")
    for s in servers:
        host, _, port = s.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"{name}: {s!r} is not host:port")
    if len(servers) == 1 and nodes > 1:
        host, _, port = servers[0].rpartition(":")
        servers = [f"{host}:{int(port) + 2 * i}" for i in range(nodes)]
    return servers


def _replication(env: dict[str, str], nodes: int) -> int:
    """``TAPELINE_TOPIC_REPLICATION``, else one replica per node up to three."""
    if _get(env, "TAPELINE_TOPIC_REPLICATION"):
        return _int(env, "TAPELINE_TOPIC_REPLICATION", 1, 10)
    return min(nodes, 3)


def load(env: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (or ``env``), validated."""
    env = dict(os.environ if env is None else env)
    protocol = _get(env, "TAPELINE_KAFKA_SECURITY_PROTOCOL").upper()
    if protocol not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
        raise ConfigError(f"TAPELINE_KAFKA_SECURITY_PROTOCOL={protocol!r}: unknown protocol")
    mechanism = _get(env, "TAPELINE_KAFKA_SASL_MECHANISM").upper()
    if protocol.startswith("SASL") and not mechanism:
        raise ConfigError("TAPELINE_KAFKA_SASL_MECHANISM: required with a SASL protocol")
    password = _get(env, "TAPELINE_KAFKA_PASSWORD")
    if mechanism and not password:
        raise ConfigError("TAPELINE_KAFKA_PASSWORD: required with SASL")
    home = Path(_get(env, "TAPELINE_HOME"))
    nodes = _int(env, "TAPELINE_KAFKA_NODES", 1, 5)
    pg_dsn = _owner_dsn(env, home)
    if urlsplit(pg_dsn).password is None and "PGPASSWORD" not in env:
        raise ConfigError("TAPELINE_PG_DSN: no password (put it in the URL or PGPASSWORD)")
    return Settings(
        home=home,
        kafka=KafkaSettings(
            bootstrap=_bootstrap(env, nodes),
            security_protocol=protocol,
            sasl_mechanism=mechanism,
            username=_get(env, "TAPELINE_KAFKA_USERNAME"),
            password=password,
            delivery_timeout_ms=_int(env, "TAPELINE_KAFKA_DELIVERY_TIMEOUT_MS", 1000, 3_600_000),
            nodes=nodes,
        ),
        topics=TopicSettings(
            partitions=_int(env, "TAPELINE_TOPIC_PARTITIONS", 1, 1000),
            replication=_replication(env, nodes),
            retention_hours=_int(env, "TAPELINE_TOPIC_RETENTION_HOURS", -1, 24 * 3650),
        ),
        pg_dsn=pg_dsn,
        mongo_url=_url(env, "TAPELINE_MONGO_URL", ("mongodb", "mongodb+srv")),
        mongo_db=_get(env, "TAPELINE_MONGO_DB") or "tapeline",
        metrics_port=_int(env, "TAPELINE_METRICS_PORT", 0, 65535),
        simulator_url=_url(env, "TAPELINE_SIMULATOR_URL", ("http", "https")),
        prefect_api_url=_url(env, "PREFECT_API_URL", ("http", "https")),
        pushgateway_url=_get(env, "TAPELINE_PUSHGATEWAY_URL"),
        simulator_rate=_int(env, "TAPELINE_SIMULATOR_RATE", 1, 1_000_000),
        code_dir=Path(_get(env, "TAPELINE_CODE_DIR")),
        prefect_auth=prefect_auth(env, home),
        listen_host=_get(env, "TAPELINE_LISTEN_HOST") or "127.0.0.1",
        pg_writer_dsn=_role_dsn(env, "TAPELINE_PG_WRITER_DSN", WRITER_ROLE, home, pg_dsn),
        pg_reader_dsn=_role_dsn(env, "TAPELINE_PG_READER_DSN", READER_ROLE, home, pg_dsn),
    )


def secret_var(credential: str) -> str:
    """The variable holding a venue credential: ``finnhub-token`` -> TAPELINE_FINNHUB_TOKEN."""
    return "TAPELINE_" + "".join(c if c.isalnum() else "_" for c in credential.upper())


def venue_secret(credential: str, env: dict[str, str] | None = None) -> str:
    """A venue's API token from the environment (``secret_var``); empty when unset."""
    env = dict(os.environ if env is None else env)
    return env.get(secret_var(credential), DEFAULTS.get(secret_var(credential), "")).strip()


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """Where downloads and builds live (Kafka jars, FerretDB); they outlive any one
    ``TAPELINE_HOME``. Read without validating the rest, so the stack can start first."""
    return Path(_get(dict(os.environ if env is None else env), "TAPELINE_CACHE"))


def drain_fault(env: dict[str, str] | None = None) -> str:
    """``TAPELINE_DRAIN_FAULT=<point>:<n>``: a test's crash point (``tasks.drain.contract``)."""
    return _get(dict(os.environ if env is None else env), "TAPELINE_DRAIN_FAULT")
