"""The real services of the local stack: Apache Kafka, PostgreSQL, a MongoDB-protocol
server and the Prefect server, on loopback, with data and logs under ``$TAPELINE_HOME``.

Each service installs what it needs once (cached: Maven repository, Go build cache,
Debian packages), starts idempotently (a healthy running instance is reused) and is
waited on with a real round trip, not just an open port.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import quote, unquote, urlsplit

from stack.process import StackError, port_open, read_pid, spawn, stop, wait_until
from tasks.core import config

STACK_DIR = Path(__file__).resolve().parent
# Downloads and builds outlive any one $TAPELINE_HOME (and ``down --purge``).
CACHE = config.cache_dir()


def _run(cmd: list[str], what: str, log: Path, *, hide: tuple[str, ...] = (), **kw) -> None:
    """Run ``cmd``, its output and the command line into ``log``; the strings in ``hide``
    (passwords on the command line) show as ``***`` there."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(cmd)
    for secret in filter(None, hide):
        shown = shown.replace(secret, "***")
    with open(log, "ab") as out:
        out.write(f"\n$ {shown}\n".encode())
        out.flush()
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
    if res.returncode != 0:
        raise StackError(f"{what} failed (exit {res.returncode}); see {log}")


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_install(packages: list[str], log: Path) -> None:
    if not _is_root() or not shutil.which("apt-get"):
        raise StackError(f"install {' '.join(packages)} (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], "apt-get update", log, env=env)
    _run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        f"apt-get install {' '.join(packages)}",
        log,
        env=env,
    )


def _cluster_id() -> str:
    """A random cluster id as Kafka writes them: a UUID in URL-safe base64. Like Kafka's own
    ``Uuid.randomUuid`` it never starts with '-', which the storage tool would read as an
    option (1 in 64 ids did: an occasional "formatting Kafka storage failed")."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass
class Service:
    name: str
    settings: config.Settings

    @property
    def dir(self) -> Path:
        return self.settings.home / self.name

    @property
    def log(self) -> Path:
        return self.settings.home / "logs" / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.settings.home / "run" / f"{self.name}.pid"

    def where(self) -> str:
        raise NotImplementedError

    def install(self) -> None:
        """Fetch or build what the service runs; cached after the first time."""

    def launch(self) -> int:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    start_timeout = 90.0

    def start(self) -> int | None:
        """Install and launch unless a healthy instance answers; returns the new pid."""
        (self.settings.home / "run").mkdir(parents=True, exist_ok=True)
        if self.answers():
            return None
        running = read_pid(self.pidfile)
        if running is not None:
            # Ours, alive, not answering (starting, or stopped by a signal): wait on it
            # rather than launch a second instance that would overwrite its pid file.
            return running
        self.install()
        return self.launch()

    def answers(self) -> bool:
        try:
            return self.healthy()
        except Exception:
            return False

    def down(self) -> bool:
        return stop(self.pidfile)


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the local cluster: a broker and a controller in one process,
    clients on ``port``, the controller on ``port + 1``. Node 1 keeps the one-node stack's
    folder, log and pid file, so a one-node home reads the same as before nodes existed."""

    id: int
    host: str
    port: int
    dir: Path
    log: Path
    pidfile: Path

    @property
    def controller(self) -> str:
        return f"{self.id}@{self.host}:{self.port + 1}"


class Kafka(Service):
    """Apache Kafka in KRaft mode, jars resolved by Maven: ``TAPELINE_KAFKA_NODES`` nodes
    (default one), each broker and controller, on consecutive port pairs from the first
    bootstrap address."""

    start_timeout = 120.0
    # Broker settings added to every node's server.properties (tests: shorter timeouts).
    overrides: Mapping[str, str] = MappingProxyType({})

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.settings.kafka.bootstrap[0].rpartition(":")
        return host, int(port)

    @property
    def nodes(self) -> list[KafkaNode]:
        host, port = self.host_port
        home = self.settings.home
        return [
            KafkaNode(
                id=i + 1,
                host=host,
                port=port + 2 * i,
                dir=self.dir if i == 0 else home / f"{self.name}-{i + 1}",
                log=self.log if i == 0 else home / "logs" / f"{self.name}-{i + 1}.log",
                pidfile=self.pidfile if i == 0 else home / "run" / f"{self.name}-{i + 1}.pid",
            )
            for i in range(self.settings.kafka.nodes)
        ]

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    @property
    def replication(self) -> int:
        """Replicas of the internal topics (consumer offsets, transactions, health)."""
        return min(len(self.nodes), 3)

    def where(self) -> str:
        nodes = self.nodes
        if len(nodes) == 1:
            return ",".join(self.settings.kafka.bootstrap)
        down = [str(n.id) for n in nodes if not port_open(n.host, n.port)]
        state = f"node {','.join(down)} not listening" if down else "all listening"
        return f"{nodes[0].host}:{nodes[0].port}+{len(nodes)} nodes ({state})"

    @property
    def lib(self) -> Path:
        """The resolved jars, one folder per pom: a checkout with another Kafka version
        resolves beside it, never over the jars a running broker has open."""
        pom = (STACK_DIR / "pom.xml").read_bytes()
        return CACHE / f"kafka-lib-{hashlib.sha256(pom).hexdigest()[:12]}"

    def install(self) -> None:
        lib = self.lib
        stamp = lib / ".resolved"
        pom = STACK_DIR / "pom.xml"
        if stamp.exists() and stamp.read_text() == pom.read_text():
            return
        if not shutil.which("mvn"):
            _apt_install(["maven"], self.log)
        if not shutil.which("java"):
            _apt_install(["openjdk-17-jre-headless"], self.log)
        shutil.rmtree(lib, ignore_errors=True)
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={lib}",
            ],
            "resolving Kafka jars with Maven",
            self.log,
        )
        stamp.write_text(pom.read_text())

    @property
    def scram(self) -> str | None:
        """The SCRAM mechanism clients use (``TAPELINE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT``
        with ``TAPELINE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512``), else None: plaintext."""
        k = self.settings.kafka
        if k.security_protocol == "SASL_PLAINTEXT" and k.sasl_mechanism.startswith("SCRAM-"):
            return k.sasl_mechanism
        return None

    def _listener_lines(self, host: str, port: int) -> list[str]:
        """The client listener: plaintext, or SASL/SCRAM whose one user (the clients'
        ``TAPELINE_KAFKA_USERNAME``) is created when the storage is formatted
        (``_scram_user``). The controller listener stays plaintext on loopback."""
        mechanism = self.scram
        if mechanism is None:
            return [
                f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{port + 1}",
                f"advertised.listeners=PLAINTEXT://{host}:{port}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        k = self.settings.kafka
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required"
            f' username="{_jaas_quote(k.username)}" password="{_jaas_quote(k.password)}";'
        )
        listener = f"listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config"
        return [
            f"listeners=SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{port + 1}",
            f"advertised.listeners=SASL_PLAINTEXT://{host}:{port}",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            f"sasl.enabled.mechanisms={mechanism}",
            f"sasl.mechanism.inter.broker.protocol={mechanism}",
            f"{listener}={_properties_escape(jaas)}",
        ]

    def _scram_user(self) -> list[str]:
        """The storage tool's arguments that create the clients' SCRAM user."""
        if self.scram is None:
            return []
        k = self.settings.kafka
        if any(c in k.password for c in ',]"'):
            raise config.ConfigError(
                'TAPELINE_KAFKA_PASSWORD: the local broker\'s SCRAM user cannot have , ] or "'
            )
        return ["--add-scram", f'{self.scram}=[name={k.username},password="{k.password}"]']

    def _write_config(self, node: KafkaNode) -> Path:
        data = node.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        replicas = self.replication
        props = node.dir / "server.properties"
        props.touch(mode=0o600)  # it may hold the SCRAM user's password
        props.chmod(0o600)
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={node.id}",
                    # A static quorum (kraft.version 0) still works in Kafka 4; all voters
                    # are known before any starts, so nothing joins dynamically.
                    f"controller.quorum.voters={','.join(n.controller for n in self.nodes)}",
                    *self._listener_lines(node.host, node.port),
                    "controller.listener.names=CONTROLLER",
                    f"log.dirs={data}",
                    f"num.partitions={self.settings.topics.partitions}",
                    f"default.replication.factor={replicas}",
                    f"offsets.topic.replication.factor={replicas}",
                    f"transaction.state.log.replication.factor={replicas}",
                    f"transaction.state.log.min.isr={min(2, replicas)}",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    *(f"{k}={v}" for k, v in self.overrides.items()),
                    "",
                ]
            )
        )
        # Kafka 4 logs through log4j 2 (log4j 1 and its properties are gone).
        (node.dir / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = File",
                    "appender.file.name = file",
                    f"appender.file.fileName = {node.log}",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.file.ref = file",
                    "",
                ]
            )
        )
        return props

    def _java(self, node: KafkaNode, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            "java",
            f"-Xmx{heap}",
            "-cp",
            str(self.lib / "*"),
            f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
            main,
            *args,
        ]

    def _formatted_for(self) -> int | None:
        """How many nodes the existing data was formatted for (None: no data yet)."""
        if not (self.dir / "data" / "meta.properties").exists():
            return None
        stamp = self.dir / "nodes"
        return int(stamp.read_text()) if stamp.exists() else 1

    def _cluster_id(self) -> str:
        """The cluster's id: the one already formatted on a node, else a new one."""
        for node in self.nodes:
            meta = node.dir / "data" / "meta.properties"
            if meta.exists():
                found = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.MULTILINE)
                if found:
                    return found.group(1)
        return _cluster_id()

    def start(self) -> int | None:
        """As ``Service.start``, node by node: only the nodes not running are launched
        (after a node was killed, ``up`` brings that one back)."""
        (self.settings.home / "run").mkdir(parents=True, exist_ok=True)
        self._check_layout()
        if self.answers():
            return None
        nodes = self.nodes
        if all(read_pid(n.pidfile) is not None for n in nodes):
            return read_pid(nodes[0].pidfile)
        self.install()
        return self.launch()

    def _check_layout(self) -> None:
        formatted, nodes = self._formatted_for(), len(self.nodes)
        if formatted is not None and formatted != nodes:
            raise StackError(
                f"Kafka's data in {self.settings.home} is for {formatted} node(s), and"
                f" TAPELINE_KAFKA_NODES={nodes}: its quorum cannot change in place."
                " Start over with `python -m stack down --purge` (deletes the data)."
            )

    def launch(self) -> int:
        self._check_layout()
        nodes = self.nodes
        cid = self._cluster_id()
        pids = []
        for node in nodes:
            props = self._write_config(node)
            if not (node.dir / "data" / "meta.properties").exists():
                _run(
                    self._java(
                        node,
                        "kafka.tools.StorageTool",
                        *("format", "-t", cid, "-c", str(props), *self._scram_user()),
                    ),
                    "formatting Kafka storage",
                    node.log,
                    hide=(self.settings.kafka.password,),
                )
            pid = read_pid(node.pidfile)
            if pid is None:
                heap = "1g" if len(nodes) == 1 else "512m"
                cmd = self._java(node, "kafka.Kafka", str(props), heap=heap)
                cmd[1:1] = ["-Xms256m", "-XX:+UseG1GC"]
                pid = spawn(cmd, node.log.with_suffix(".out"), node.pidfile)
            pids.append(pid)
        (self.dir / "nodes").write_text(str(len(nodes)))
        return pids[0]

    def healthy(self) -> bool:
        """Every node listens and is a registered broker, and a record goes round."""
        nodes = self.nodes
        if not all(port_open(n.host, n.port) for n in nodes):
            return False
        if len(nodes) > 1:
            from tasks.core.kafka import admin

            client = admin(self.settings, request_timeout_ms=5000)
            try:
                brokers = client.describe_cluster()["brokers"]
            finally:
                client.close()
            # a node killed and started again is fenced until it has caught up
            if sum(not b.get("is_fenced") for b in brokers) < len(nodes):
                return False
        return kafka_round_trip(self.settings, replication=self.replication)

    def down(self) -> bool:
        stopped = [stop(n.pidfile) for n in reversed(self.nodes)]
        return any(stopped)

    def active_controller(self) -> int:
        """The node id leading the KRaft quorum (the active controller)."""
        from tasks.core.kafka import admin

        client = admin(self.settings, request_timeout_ms=5000)
        try:
            quorum = client.describe_metadata_quorum()
        finally:
            client.close()
        return quorum["topics"][0]["partitions"][0]["leader_id"]

    def version(self) -> str:
        """What the broker itself says: its start-up banner and its DescribeFeatures."""
        from tasks.core.kafka import admin

        client = admin(self.settings)
        try:
            level = client.describe_features()["metadata.version"]["finalized"][1]
        finally:
            client.close()
        banner = re.findall(r"Kafka version: (\S+)", self.log.read_text(errors="replace"))
        where = f"metadata.version level {level}"
        if len(self.nodes) > 1:
            where += f"; {len(self.nodes)} nodes, active controller {self.active_controller()}"
        return f"Apache Kafka {banner[-1] if banner else '?'} ({where})"


def _jaas_quote(value: str) -> str:
    """A value inside a JAAS option's double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _properties_escape(value: str) -> str:
    """A value as a Java properties file reads it back (backslashes are escapes there)."""
    return value.replace("\\", "\\\\")


def kafka_round_trip(
    settings: config.Settings, topic: str = "_tapeline.health", replication: int = 1
) -> bool:
    """Produce a unique record and read it back: the broker really works end to end."""
    from kafka import TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from tasks.core.kafka import admin, consumer, producer

    client = admin(settings, request_timeout_ms=5000)
    try:
        if topic not in client.list_topics():
            with contextlib.suppress(TopicAlreadyExistsError):
                client.create_topics([NewTopic(topic, 1, replication)])
    finally:
        client.close()
    token = uuid.uuid4().hex.encode()
    p = producer(settings, linger_ms=0, max_block_ms=5000)
    try:
        meta = p.send(topic, key=b"health", value=token).get(timeout=10)
    finally:
        p.close(timeout=5)
    c = consumer(None, settings, consumer_timeout_ms=5000)
    try:
        tp = TopicPartition(topic, meta.partition)
        c.assign([tp])
        c.seek(tp, meta.offset)
        for rec in c:
            return rec.value == token
        return False
    finally:
        c.close()


class Postgres(Service):
    """PostgreSQL from Debian's packages in its own data directory and port."""

    @property
    def url(self):
        return urlsplit(self.settings.pg_dsn)

    def where(self) -> str:
        u = self.url
        return f"{u.hostname}:{u.port or 5432}/{u.path.lstrip('/')}"

    def _bindir(self) -> Path | None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
        return candidates[0].parent if candidates else None

    @property
    def _user(self) -> str | None:
        return "postgres" if _is_root() else None

    def install(self) -> None:
        if self._bindir() is None:
            _apt_install(["postgresql"], self.log)
        if self._bindir() is None:
            raise StackError(f"PostgreSQL binaries not found after install; see {self.log}")

    def _ensure_traversable(self) -> None:
        """The server runs as ``postgres``, which must be able to reach its data folder."""
        if not self._user:
            return
        for d in reversed(self.dir.resolve().parents):
            mode = d.stat().st_mode
            if not mode & 0o001:
                d.chmod(mode | 0o001)  # search only: no listing, no reading
                with open(self.log, "a") as out:
                    out.write(f"granted o+x on {d} so user postgres can reach {self.dir}\n")

    def _chown(self, *paths: Path) -> None:
        if self._user:
            for p in paths:
                shutil.chown(p, self._user, self._user)

    def launch(self) -> int:
        bindir = self._bindir()
        assert bindir is not None
        data, sock = self.dir / "data", self.dir / "socket"
        for d in (self.dir, sock):
            d.mkdir(parents=True, exist_ok=True)
        self._chown(self.dir, sock)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        self._ensure_traversable()
        self._chown(self.log)
        u = self.url
        if not (data / "PG_VERSION").exists():
            pwfile = self.dir / ".pw"
            pwfile.write_text(unquote(u.password or "") or os.environ.get("PGPASSWORD", ""))
            self._chown(pwfile)
            pwfile.chmod(0o600)
            try:
                cmd = [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    u.username or "tapeline",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
                _run(
                    ["runuser", "-u", self._user, "--", *cmd] if self._user else cmd,
                    "initdb",
                    self.log,
                )
            finally:
                pwfile.unlink(missing_ok=True)
        cmd = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-h",
            u.hostname or "127.0.0.1",
            "-p",
            str(u.port or 5432),
            "-k",
            str(sock),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "synchronous_commit=on",
            "-c",
            "max_wal_size=2GB",
            "-c",
            "fsync=on",
        ]
        return spawn(cmd, self.log, self.pidfile, user=self._user)

    def healthy(self) -> bool:
        import psycopg2

        u = self.url
        if not port_open(u.hostname or "127.0.0.1", u.port or 5432):
            return False
        dbname = u.path.lstrip("/") or "tapeline"
        try:
            conn = psycopg2.connect(self.settings.pg_dsn, connect_timeout=3)
        except psycopg2.OperationalError as e:
            if f'database "{dbname}" does not exist' not in str(e):
                raise
            conn = psycopg2.connect(self.settings.pg_dsn, dbname="postgres", connect_timeout=3)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{dbname}"')
            conn.close()
            conn = psycopg2.connect(self.settings.pg_dsn, connect_timeout=3)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                ok = cur.fetchone() == (1,)
            if ok:
                self._roles(conn)
            return ok
        finally:
            conn.close()

    def _roles(self, conn) -> None:
        """The roles per purpose the settings name (``tasks.core.config``), made once:
        the writer may read and change rows but not the schema, the reader may only read.
        Tables the owner creates later are granted by default; each schema's USAGE is
        granted by the migrations (``tasks.drain.migrate.grant``)."""
        from psycopg2 import sql

        owner = urlsplit(self.settings.pg_dsn).username or "tapeline"
        wanted = {
            config.WRITER_ROLE: (self.settings.pg_writer_dsn, "SELECT, INSERT, UPDATE, DELETE"),
            config.READER_ROLE: (self.settings.pg_reader_dsn, "SELECT"),
        }
        with conn.cursor() as cur:
            for role, (dsn, privileges) in wanted.items():
                u = urlsplit(dsn)
                if u.username != role:  # settings point elsewhere: nothing to make here
                    continue
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if cur.fetchone() is not None:
                    continue
                password = unquote(u.password or "")
                cur.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)),
                    (password,),
                )
                cur.execute(
                    sql.SQL(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT " + privileges
                        + " ON TABLES TO {}"
                    ).format(sql.Identifier(owner), sql.Identifier(role))
                )
                if role == config.WRITER_ROLE:
                    cur.execute(
                        sql.SQL(
                            "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT USAGE, SELECT, UPDATE"
                            " ON SEQUENCES TO {}"
                        ).format(sql.Identifier(owner), sql.Identifier(role))
                    )

    def version(self) -> str:
        import psycopg2

        conn = psycopg2.connect(self.settings.pg_dsn, connect_timeout=3)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return f"PostgreSQL {cur.fetchone()[0]}"
        finally:
            conn.close()

    def down(self) -> bool:
        """``pg_ctl stop -m fast`` for a clean checkpoint, then make sure it is gone."""
        bindir = self._bindir()
        data = self.dir / "data"
        running = read_pid(self.pidfile) is not None
        if bindir and running and (data / "postmaster.pid").exists():
            cmd = [str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]
            subprocess.run(
                ["runuser", "-u", self._user, "--", *cmd] if self._user else cmd,
                capture_output=True,
                timeout=60,
            )
        return stop(self.pidfile) or running


# FerretDB 1.24's SQLite backend finds, updates and deletes a document by ``_id`` with the
# expression ``->'$._id'`` while its unique index is on ``->"_id"``; SQLite cannot match
# the two, so each such lookup reads the whole table. The wallet sink looks versions up by
# ``_id`` a few hundred times a batch: with an hour of versions kept, a batch of 25
# transactions took 20-30 s in the soak. The build patches that one line of the module.
_SQLITE_ID = (
    """IDColumn = DefaultColumn + "->'$._id'\"""",
    """IDColumn = DefaultColumn + `->"_id"`""",
)
_FERRETDB = "github.com/FerretDB/FerretDB"


def _patched_ferretdb(src: Path, log: Path) -> Path:
    """A build folder of its own under the cache: ``src`` with the FerretDB module beside
    it, patched (``_SQLITE_ID``) and put in place of the released one by a ``replace``
    directive. The caller removes it (``_remove_tree``) after the build."""
    build = Path(tempfile.mkdtemp(prefix="ferretdb-build-", dir=CACHE))
    for name in ("go.mod", "go.sum", "main.go"):
        shutil.copyfile(src / name, build / name)
    out = subprocess.run(
        ["go", "mod", "download", "-json", _FERRETDB],
        cwd=build, capture_output=True, text=True, env={**os.environ, "CGO_ENABLED": "0"},
    )  # fmt: skip
    with open(log, "a") as f:
        f.write(f"\n$ go mod download -json {_FERRETDB}\n{out.stdout}{out.stderr}")
    try:
        info = json.loads(out.stdout)
    except ValueError:
        info = {}
    if out.returncode != 0 or "Dir" not in info:
        why = info.get("Error") or out.stderr.strip()[-500:] or f"exit {out.returncode}"
        raise StackError(f"downloading {_FERRETDB} failed: {why}; see {log}")
    module = build / "ferretdb"
    shutil.copytree(info["Dir"], module, copy_function=shutil.copyfile)
    for d, _, _ in os.walk(module):  # the module cache is read-only; the copy need not be
        os.chmod(d, 0o755)
    source = module / "internal/backends/sqlite/metadata/metadata.go"
    text = source.read_text()
    if text.count(_SQLITE_ID[0]) != 1:
        raise StackError(f"{source}: the line to patch is not there once: {_SQLITE_ID[0]}")
    source.write_text(text.replace(*_SQLITE_ID))
    _run(
        ["go", "mod", "edit", "-replace", f"{_FERRETDB}=./ferretdb"],
        "pointing the build at the patched FerretDB",
        log,
        cwd=build,
    )
    return build


def _remove_tree(path: Path) -> None:
    """rmtree of a build folder, also where a copy of Go's read-only module cache was left
    read-only (an interrupted copy)."""
    for d, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(d, 0o755)
    shutil.rmtree(path, ignore_errors=True)


class Mongo(Service):
    """``mongod`` when the machine has one, else FerretDB 1.x on SQLite, built with Go."""

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.settings.mongo_url)
        return u.hostname or "127.0.0.1", u.port or 27017

    def where(self) -> str:
        host, port = self.host_port
        return f"{host}:{port} ({'mongod' if shutil.which('mongod') else 'FerretDB'})"

    @property
    def binary(self) -> Path:
        return CACHE / "bin" / "ferretdb-local"

    def install(self) -> None:
        if shutil.which("mongod"):
            return
        src = STACK_DIR / "ferretdb"
        stamp = self.binary.with_suffix(".stamp")
        want = (src / "go.sum").read_text() + (src / "main.go").read_text() + repr(_SQLITE_ID)
        if self.binary.exists() and stamp.exists() and stamp.read_text() == want:
            return
        if not shutil.which("go"):
            _apt_install(["golang-go"], self.log)
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        build = _patched_ferretdb(src, self.log)
        try:
            _run(
                ["go", "build", "-trimpath", "-o", str(self.binary), "."],
                "building FerretDB (go build)",
                self.log,
                cwd=build,
                env={**os.environ, "CGO_ENABLED": "0"},
            )
        finally:
            _remove_tree(build)
        stamp.write_text(want)


    def launch(self) -> int:
        host, port = self.host_port
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        if shutil.which("mongod"):
            cmd = ["mongod", "--dbpath", str(data), "--bind_ip", host, "--port", str(port)]
        else:
            cmd = [str(self.binary), "-listen", f"{host}:{port}", "-sqlite-dir", str(data)]
        return spawn(cmd, self.log, self.pidfile)

    def healthy(self) -> bool:
        import pymongo

        if not port_open(*self.host_port):
            return False
        client = pymongo.MongoClient(self.settings.mongo_url, serverSelectionTimeoutMS=2000)
        try:
            return client.admin.command("ping").get("ok") == 1.0
        finally:
            client.close()

    def version(self) -> str:
        import pymongo

        client = pymongo.MongoClient(self.settings.mongo_url, serverSelectionTimeoutMS=2000)
        try:
            info = client.server_info()
        finally:
            client.close()
        if "ferretdbVersion" not in info:
            return f"MongoDB {info.get('version')}"
        pinned = re.search(r"FerretDB (v\S+)", (STACK_DIR / "ferretdb" / "go.mod").read_text())
        return f"FerretDB {pinned.group(1) if pinned else '?'} (speaks MongoDB {info['version']})"


# How the Prefect server runs its own services, wherever it runs (this stack, compose, the
# Helm values; tests/test_compose.py and tests/test_kubernetes.py hold them to this):
# - Deployment concurrency slots are held under leases; in memory (the default) a server
#   restart forgets them and the slots stay taken for good (seen in the soak: every
#   scheduled drain Cancelled after the server was restarted). On disk they survive, and
#   an expired one is reclaimed.
# - The cancellation clean-up looks, every loop, at each run Cancelled in the last day for
#   task runs to cancel. A drain or aggregation run that finds its deployment's slots taken
#   is Cancelled at once and has none, but there are hundreds a day: at the default 20 s
#   loop, 623 of them kept the server at 44-70% of a core, taken from the live feed on a
#   2-core machine. Every 5 minutes the server idles at 3%; the task runs of a cancelled
#   drain are marked Cancelled up to 5 minutes later.
PREFECT_SERVER_TUNING: Mapping[str, str] = MappingProxyType(
    {
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": "300",
    }
)


class PrefectServer(Service):
    """``prefect server start`` with its own PREFECT_HOME and its database in the stack's
    PostgreSQL (database ``prefect``), as in compose. On SQLite a busy server (a soak,
    the test suite) answered "database is locked" for minutes: runs stayed Pending,
    proactive triggers were skipped, and every scheduled drain was Cancelled."""

    start_timeout = 120.0
    database = "prefect"

    @property
    def url(self):
        return urlsplit(self.settings.prefect_api_url)

    def where(self) -> str:
        u = self.url
        return f"{u.scheme}://{u.hostname}:{u.port} (UI), API {self.settings.prefect_api_url}"

    def database_url(self) -> str:
        """The server's SQLAlchemy URL: the stack's PostgreSQL, database ``prefect``."""
        pg = urlsplit(self.settings.pg_dsn)
        # still percent-encoded from the DSN, as this URL needs it
        password = pg.password or quote(os.environ.get("PGPASSWORD", ""), safe="")
        auth = f"{pg.username or 'tapeline'}:{password}@" if password else f"{pg.username}@"
        return f"postgresql+asyncpg://{auth}{pg.hostname}:{pg.port or 5432}/{self.database}"

    def env(self) -> dict[str, str]:
        """The server refuses requests without the stack's credentials (basic auth), asks
        browsers for a CSRF token on every state change, and lets no other web origin call
        it: a local process or a web page must not read secrets or run code through it."""
        u = self.url
        origin = f"{u.scheme}://{u.hostname}:{u.port or 4200}"
        return {
            **os.environ,
            **self.settings.prefect_env(),
            "PREFECT_HOME": str(self.dir),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origin,
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url(),
            **PREFECT_SERVER_TUNING,
        } | (
            {"PREFECT_SERVER_API_AUTH_STRING": self.settings.prefect_auth}
            if self.settings.prefect_auth
            else {}
        )

    def _database(self) -> None:
        """PostgreSQL up (started if nothing runs it yet; waited on if it is starting),
        and the server's database created once."""
        import psycopg2

        pg = Postgres("postgres", self.settings)
        if not pg.answers():
            pid = read_pid(pg.pidfile) or pg.start()
            wait_until(pg.healthy, "postgres", pg.log, pg.start_timeout, pid)
        conn = psycopg2.connect(self.settings.pg_dsn, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()

    def launch(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._database()
        u = self.url
        prefect = Path(sys.executable).parent / "prefect"
        cmd = [
            str(prefect) if prefect.exists() else "prefect",
            "server",
            "start",
            "--host",
            u.hostname or "127.0.0.1",
            "--port",
            str(u.port or 4200),
        ]
        return spawn(cmd, self.log, self.pidfile, env=self.env())

    def healthy(self) -> bool:
        with urllib.request.urlopen(self.settings.prefect_api_url + "/health", timeout=3) as r:
            return r.status == 200 and r.read().strip() == b"true"

    def version(self) -> str:
        req = urllib.request.Request(self.settings.prefect_api_url + "/admin/version")
        token = base64.b64encode(self.settings.prefect_auth.encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=3) as r:
            return f"Prefect server {r.read().decode().strip(chr(34))}"


ORDER = ("kafka", "postgres", "mongo", "prefect")
CLASSES: dict[str, type[Service]] = {
    "kafka": Kafka,
    "postgres": Postgres,
    "mongo": Mongo,
    "prefect": PrefectServer,
}


def services(
    settings: config.Settings | None = None, names: tuple[str, ...] = ORDER
) -> list[Service]:
    settings = settings or config.load()
    return [CLASSES[n](n, settings) for n in names]


def up(items: list[Service]) -> dict[str, str]:
    """Start every service, then wait for all of them: the slow starts overlap."""
    started = {s.name: s.start() for s in items}
    for s in items:
        pid = started[s.name]
        if pid is not None:
            wait_until(s.healthy, s.name, s.log, s.start_timeout, pid)
    return {n: "running" if pid is None else "started" for n, pid in started.items()}
