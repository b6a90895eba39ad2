"""Checks the docker compose stack and its monitoring files without a Docker engine.

No engine runs in CI, so the stack is validated by reading it: every rule a broken
`docker compose up` would teach us late (an unhealthy dependency started anyway, a
password committed, a volume or variable nobody declared, a rule file Prometheus cannot
find) is checked here on the parsed files. Where the real tools exist on the machine
(`docker compose`, `promtool`, PostgreSQL's `initdb`), they are run as well.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from stack.services import PREFECT_SERVER_TUNING

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"
GRAFANA_PROVISIONING = ROOT / "monitoring" / "grafana" / "provisioning"
POSTGRES_INIT = ROOT / "compose" / "postgres" / "10-prefect-and-grafana.sh"

EXPECTED_SERVICES = {
    "kafka",
    "kafka-init",
    "migrate",
    "postgres",
    "mongo",
    "prefect-server",
    "worker",
    "reaper",
    "simulator",
    "pushgateway",
    "exporter",
    "prometheus",
    "grafana",
    "kafka-ui",
}
# What the host may reach, and nothing else; data services share the local stack's ports.
EXPECTED_PORTS = {
    "kafka": {("127.0.0.1", 19092, 19092)},
    "postgres": {("127.0.0.1", 15432, 5432)},
    "mongo": {("127.0.0.1", 27117, 27017)},
    "prefect-server": {("127.0.0.1", 14200, 4200)},
    "prometheus": {("127.0.0.1", 9090, 9090)},
    "grafana": {("127.0.0.1", 3000, 3000)},
    "kafka-ui": {("127.0.0.1", 8080, 8080)},
}
APP_ENV_NAMES = {
    "TAPELINE_KAFKA_BOOTSTRAP",
    "TAPELINE_PG_DSN",
    "TAPELINE_MONGO_URL",
    "TAPELINE_MONGO_DB",
    "PREFECT_API_URL",
    "TAPELINE_METRICS_PORT",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE_KEY|AUTH_STRING", re.IGNORECASE)
# ${NAME}, ${NAME:?msg}, ${NAME:-default}, $NAME; `$$` is compose's escaped dollar.
VARIABLE_REF = re.compile(
    r"(?<!\$)(?:\$\$)*\$(?:\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))"
)
REQUIRED_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:\?[^}]*)?\}$")
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^:/@\s]+:([^@]+)@")
DURATION_PART = re.compile(r"(\d+)(ms|us|h|m|s)")
DURATION_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example line is not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def is_one_shot(service: dict[str, Any]) -> bool:
    """A one-shot runs to completion once: compose must not restart it."""
    return service.get("restart") == "no"


def duration_seconds(text: str) -> float:
    parts = DURATION_PART.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(int(n) * DURATION_SECONDS[u] for n, u in parts)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on must use the long form with a condition"
    return deps


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def published_ports(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    ports = set()
    for entry in service.get("ports", []):
        assert isinstance(entry, str), "use the short 'IP:HOST:CONTAINER' form"
        parts = entry.split(":")
        assert len(parts) == 3, f"port {entry!r} must name the host IP to bind"
        ports.add((parts[0], int(parts[1]), int(parts[2])))
    return ports


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    mounts = []
    for entry in service.get("volumes", []):
        source, _, rest = entry.partition(":")
        target, _, mode = rest.partition(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, mode))
    return mounts


def named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), "use the short 'SOURCE:TARGET[:MODE]' volume form"
        source = entry.partition(":")[0]
        if not source.startswith((".", "/")):
            names.append(source)
    return names


def test_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED_SERVICES


def test_every_service_says_how_it_restarts(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert service.get("restart") in {"no", "unless-stopped", "always"}, name
    one_shots = {name for name, service in services.items() if is_one_shot(service)}
    assert one_shots == {"kafka-init", "migrate"}


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert service["build"]["context"] == ".", name
            continue
        image = service["image"]
        assert "$" not in image, f"{name}: image tag must be literal, not {image!r}"
        _, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: tag {tag!r} is not a version"


def test_app_image_is_pinned_and_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert bases == ["python:3.11.13-slim-bookworm"]
    assert re.search(r"^WORKDIR /app$", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    # config.load() may make local secrets under TAPELINE_HOME: the app user must own it,
    # or one-shot services such as migrate fail before doing anything
    home = re.findall(r"^ENV TAPELINE_HOME=(\S+)", dockerfile, re.MULTILINE)
    assert home == [f"/home/{users[-1]}/.tapeline"]
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".env", ".git", ".venv"} <= ignored


def test_app_services_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    app = {name: s for name, s in services.items() if "build" in s}
    assert set(app) == {"worker", "reaper", "simulator", "kafka-init", "migrate", "exporter"}
    assert {s["image"] for s in app.values()} == {"tapeline/app:dev"}


def test_long_running_services_have_real_healthchecks(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if is_one_shot(service):
            assert "healthcheck" not in service, f"{name}: a one-shot exits, never healthy"
            continue
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable", False), name
        test = check["test"]
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, name
        assert len(test) > 1 and all(part.strip() for part in test[1:]), name
        interval = duration_seconds(check["interval"])
        timeout = duration_seconds(check["timeout"])
        assert 0 < timeout <= interval <= 60, f"{name}: timeout {timeout} interval {interval}"
        assert isinstance(check["retries"], int) and check["retries"] >= 3, name
        if "start_period" in check:
            duration_seconds(check["start_period"])


def test_dependencies_wait_for_the_right_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert isinstance(spec, dict) and "condition" in spec, f"{name} -> {dep}"
            target = services[dep]
            if is_one_shot(target):
                assert spec["condition"] == "service_completed_successfully", f"{name} -> {dep}"
            else:
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
                assert "healthcheck" in target, f"{name} waits on {dep}, which has none"


def test_dependencies_have_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in depends_on(services[name]):
                visit(dep, (*path, name))
            done.add(name)

    for name in services:
        visit(name, ())


def test_services_start_after_what_they_use(services: dict[str, dict[str, Any]]) -> None:
    assert set(depends_on(services["worker"])) == {
        "prefect-server",
        "kafka",
        "kafka-init",
        "migrate",
        "postgres",
        "mongo",
        "simulator",
    }
    assert set(depends_on(services["kafka-init"])) == {"kafka"}
    assert set(depends_on(services["prefect-server"])) == {"postgres"}
    assert set(depends_on(services["grafana"])) == {"prometheus", "postgres"}
    assert set(depends_on(services["kafka-ui"])) == {"kafka"}
    assert set(depends_on(services["exporter"])) == {"kafka", "postgres", "prefect-server"}
    assert set(depends_on(services["reaper"])) == {"worker"}


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                # An auth string is user:password; its password part is the secret.
                secret = value.split(":", 1)[1] if key.endswith("AUTH_STRING") else value
                assert REQUIRED_REF.match(secret), f"{name}.{key} must be ${{VAR:?...}}"
        for text in strings(service):
            for password in URL_PASSWORD.findall(text):
                assert REQUIRED_REF.match(password), f"{name}: literal password in {text!r}"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in VARIABLE_REF.finditer(text):
        modifier = match.group(2) or ""
        assert not modifier.startswith(("-", ":-")), (
            f"{match.group(0)}: a default is a literal value; require it with :?"
        )


def test_env_example_lists_every_variable(env_example: dict[str, str]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    used = {m.group(1) or m.group(3) for m in VARIABLE_REF.finditer(text)}
    assert used, "compose file references no variables"
    assert used == set(env_example), "used and listed variables differ"
    for name, value in env_example.items():
        assert value.startswith("change-me"), f"{name} in .env.example must be a placeholder"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value), f"{name} must stay URL-safe"


def test_env_file_is_git_ignored() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False, timeout=10
    )
    assert result.returncode == 0, ".env must be git-ignored"


def test_volumes_are_declared_and_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in compose["services"].items():
        used.update(named_volumes(service))
        for source, target, mode in bind_mounts(service):
            assert source.startswith("./"), f"{name}: bind {source!r} must be in the repo"
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            assert mode == "ro", f"{name}: config mount {source} -> {target} must be :ro"
    assert used == declared, "declared and used named volumes differ"


def test_ports_bind_only_what_is_needed(services: dict[str, dict[str, Any]]) -> None:
    published = {name: published_ports(s) for name, s in services.items() if "ports" in s}
    assert published == EXPECTED_PORTS
    for name, service in services.items():
        assert "network_mode" not in service, f"{name} must stay on the compose network"


def test_app_containers_get_the_fixed_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = environment(services["worker"])
    assert set(worker) >= APP_ENV_NAMES
    assert worker["TAPELINE_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["TAPELINE_METRICS_PORT"] == "9108"
    assert worker["TAPELINE_SIMULATOR_URL"] == "http://simulator:18765"
    assert worker["TAPELINE_PUSHGATEWAY_URL"] == "http://pushgateway:9091"
    assert "@postgres:5432/tapeline" in worker["TAPELINE_PG_DSN"]
    assert "@mongo:27017/" in worker["TAPELINE_MONGO_URL"]
    assert environment(services["kafka-init"]) == {"TAPELINE_KAFKA_BOOTSTRAP": "kafka:9092"}
    assert environment(services["simulator"]) == {}, "the simulator needs no credentials"
    probe = environment(services["exporter"])
    assert set(probe) == {
        "TAPELINE_KAFKA_BOOTSTRAP",
        "TAPELINE_PG_DSN",
        "PREFECT_API_URL",
        "TAPELINE_PG_READER_DSN",
        "PREFECT_API_AUTH_STRING",
        "TAPELINE_LISTEN_HOST",
    }
    # Flows write rows as the writer and read as the reader; the exporter only reads.
    assert worker["TAPELINE_PG_WRITER_DSN"].startswith("postgresql://tapeline_writer:")
    assert worker["TAPELINE_PG_READER_DSN"].startswith("postgresql://grafana_reader:")
    assert probe["TAPELINE_PG_READER_DSN"] == worker["TAPELINE_PG_READER_DSN"]
    assert probe["TAPELINE_KAFKA_BOOTSTRAP"] == worker["TAPELINE_KAFKA_BOOTSTRAP"]
    # Only the one-shot migrate service holds the owner's password.
    owner = "${POSTGRES_PASSWORD"
    holders = [n for n, svc in services.items() if owner in json.dumps(svc.get("environment"))]
    assert sorted(holders) == ["migrate", "postgres"]
    assert worker["TAPELINE_PG_DSN"] == worker["TAPELINE_PG_WRITER_DSN"]
    assert probe["TAPELINE_PG_DSN"] == probe["TAPELINE_PG_READER_DSN"]
    assert services["worker"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["migrate"]["command"] == ["python", "-m", "tasks.drain.migrate"]
    assert probe["PREFECT_API_URL"] == worker["PREFECT_API_URL"]
    # Every Prefect client authenticates with the one secret the server requires.
    server = environment(services["prefect-server"])
    auth = server["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth == "tapeline:${PREFECT_API_PASSWORD:?set in .env}"
    assert server["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    # The server runs its own services as the local stack's does, leases on a volume.
    assert PREFECT_SERVER_TUNING.items() <= server.items()
    assert "prefect-home:/root/.prefect" in services["prefect-server"]["volumes"]
    for env in (worker, probe):
        assert env["PREFECT_API_AUTH_STRING"] == auth


def test_kafka_listeners_match_clients_and_ports(services: dict[str, dict[str, Any]]) -> None:
    kafka = environment(services["kafka"])
    advertised = dict(item.split("://") for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised == {"PLAINTEXT": "kafka:9092", "PLAINTEXT_HOST": "localhost:19092"}
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka-data:" + kafka["KAFKA_LOG_DIRS"] in services["kafka"]["volumes"]


def test_commands_run_the_right_programs(services: dict[str, dict[str, Any]]) -> None:
    assert services["kafka-init"]["command"] == ["python", "-m", "tasks.core.topics"]
    assert services["exporter"]["command"] == [
        "python", "-m", "tasks.telemetry.exporter", "--port", "9110",
    ]  # fmt: skip
    assert services["simulator"]["command"] == [
        "python", "-m", "simulator", "--host", "0.0.0.0", "--port", "18765",
    ]  # fmt: skip
    assert services["reaper"]["command"][:3] == ["python", "-m", "deployments.reaper"]
    reaper = environment(services["reaper"])  # the Prefect API is all it talks to
    assert set(reaper) == {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING"}
    script = services["worker"]["command"][-1]
    create = script.index("prefect work-pool create tapeline --type process")
    deploy = script.index("python -m deployments.setup")
    start = script.index("exec prefect worker start --pool tapeline --type process")
    assert create < deploy < start
    server = services["prefect-server"]
    assert server["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    db_url = environment(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://prefect:")
    assert db_url.endswith("@postgres:5432/prefect")


def test_postgres_init_creates_the_prefect_database(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = bind_mounts(services["postgres"])
    assert ("./compose/postgres", "/docker-entrypoint-initdb.d", "ro") in mounts
    assert os.access(POSTGRES_INIT, os.X_OK), "init scripts must be executable"
    env = environment(services["postgres"])
    script = POSTGRES_INIT.read_text(encoding="utf-8")
    for name in re.findall(r"\$\{(\w+):\?", script):
        assert name in env, f"init script needs {name} in the postgres environment"


def prometheus_targets(config: dict[str, Any]) -> dict[str, set[str]]:
    return {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }


def honoring_labels(config: dict[str, Any]) -> set[str]:
    """Jobs that keep the scraped labels: only the Pushgateway, whose pushed `job` and
    `flow` labels must survive the scrape."""
    return {job["job_name"] for job in config["scrape_configs"] if job.get("honor_labels")}


@pytest.mark.parametrize("filename", ["prometheus.yml", "prometheus.local.yml"])
def test_prometheus_rule_files_exist_and_parse(filename: str) -> None:
    config = load_yaml(PROMETHEUS_DIR / filename)
    assert config["rule_files"], "rule_files is empty"
    for pattern in config["rule_files"]:
        files = glob.glob(str(PROMETHEUS_DIR / pattern))
        assert files, f"{pattern} matches no rule file"
        for path in files:
            groups = load_yaml(Path(path))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert rules, f"{path} has no rules"
            for rule in rules:
                assert rule["expr"].strip()
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                    assert rule["annotations"]["summary"].strip()


def test_prometheus_scrapes_the_compose_services(
    services: dict[str, dict[str, Any]],
) -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    targets = prometheus_targets(config)
    assert targets == {
        "prometheus": {"localhost:9090"},
        "tapeline-ingest": {"worker:9108"},
        "pushgateway": {"pushgateway:9091"},
        "tapeline-exporter": {"exporter:9110"},
    }
    assert honoring_labels(config) == {"pushgateway"}
    for host in {t.rpartition(":")[0] for group in targets.values() for t in group}:
        assert host == "localhost" or host in services, f"no compose service {host}"
    prometheus = services["prometheus"]
    assert ("./monitoring/prometheus", "/etc/prometheus", "ro") in bind_mounts(prometheus)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_prometheus_local_scrapes_loopback_only() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.local.yml")
    targets = prometheus_targets(config)
    assert targets == {
        "prometheus": {"127.0.0.1:9090"},
        "tapeline-ingest": {"127.0.0.1:9108"},
        "pushgateway": {"127.0.0.1:9091"},
        "tapeline-exporter": {"127.0.0.1:9110"},
    }
    assert honoring_labels(config) == {"pushgateway"}


def test_promtool_accepts_configs_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    for filename in ("prometheus.yml", "prometheus.local.yml"):
        run = subprocess.run(
            [promtool, "check", "config", filename],
            cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
    run = subprocess.run(
        [promtool, "test", "rules", "tests/tapeline.test.yml"],
        cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_grafana_datasources_point_at_the_stack(services: dict[str, dict[str, Any]]) -> None:
    config = load_yaml(GRAFANA_PROVISIONING / "datasources" / "datasources.yml")
    assert config["apiVersion"] == 1
    sources = {source["type"]: source for source in config["datasources"]}
    assert set(sources) == {"prometheus", "grafana-postgresql-datasource"}
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert ("127.0.0.1", 9090, 9090) in published_ports(services["prometheus"])
    postgres = sources["grafana-postgresql-datasource"]
    assert postgres["url"] == "postgres:5432"
    assert postgres["jsonData"]["database"] == "tapeline"
    assert postgres["user"] == "grafana_reader"
    password = postgres["secureJsonData"]["password"]
    match = re.fullmatch(r"\$\{(\w+)\}", password)
    assert match, "the datasource password must come from the environment"
    grafana = services["grafana"]
    assert match.group(1) in environment(grafana)
    assert "grafana_reader" in POSTGRES_INIT.read_text(encoding="utf-8")
    assert all(not SECRET_NAME.search(key) for key in postgres.get("jsonData", {}))


def test_grafana_dashboards_provider_matches_the_mount(
    services: dict[str, dict[str, Any]],
) -> None:
    config = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml")
    assert config["apiVersion"] == 1
    mounts = {target: source for source, target, _ in bind_mounts(services["grafana"])}
    assert mounts["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    for provider in config["providers"]:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert path in mounts, f"dashboards path {path} is not mounted"
        assert (ROOT / mounts[path]).is_dir()


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker client not installed")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    run = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE),
         "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


def postgres_bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    """A private directory under /tmp: pytest's tmp_path is closed to other users."""
    with tempfile.TemporaryDirectory(prefix="tapeline-pg-") as path:
        yield Path(path)


def test_postgres_init_script_runs(cluster_dir: Path) -> None:
    """Runs the init script on a throwaway cluster, as the postgres image would."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser")
        prefix = [runuser, "-u", "postgres", "--"]
        shutil.chown(cluster_dir, "postgres")
    data, socket_dir = cluster_dir / "data", str(cluster_dir)

    def run(*args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [*prefix, "env", *(f"{k}={v}" for k, v in (env or {}).items()), *args],
            capture_output=True, text=True, timeout=30, check=False, cwd=cluster_dir,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run(str(bindir / "initdb"), "-D", str(data), "-U", "tapeline", "-A", "trust")
    options = f"-c listen_addresses='' -k {socket_dir}"
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        # -l: the server must not hold our stdout pipe open, or run() never returns.
        log = str(cluster_dir / "server.log")
        run(*pg_ctl, "-l", log, "-o", options, "-w", "-t", "20", "start")
        psql = [str(bindir / "psql"), "-h", socket_dir, "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        run(*psql, "-U", "tapeline", "-d", "postgres", "-c", "CREATE DATABASE tapeline")
        run(
            "sh",
            str(POSTGRES_INIT),
            env={
                "PATH": f"{bindir}:{os.environ['PATH']}",
                "PGHOST": socket_dir,
                "POSTGRES_USER": "tapeline",
                "POSTGRES_DB": "tapeline",
                "PREFECT_DB_PASSWORD": "test-prefect",
                "GRAFANA_PG_PASSWORD": "test-grafana",
                "PG_WRITER_PASSWORD": "test-writer",
            },
        )
        query = "SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'"
        assert run(*psql, "-U", "prefect", "-d", "prefect", "-c", query).strip() == "pg_trgm"
        run(*psql, "-U", "tapeline", "-d", "tapeline", "-c", "CREATE TABLE trades (id int)")
        reader = [*psql, "-U", "grafana_reader", "-d", "tapeline", "-c"]
        assert run(*reader, "SELECT count(*) FROM trades").strip() == "0"
        refused = subprocess.run(
            [*prefix, *reader, "INSERT INTO trades VALUES (1)"],
            capture_output=True, text=True, timeout=30, check=False, cwd=cluster_dir,
        )  # fmt: skip
        assert refused.returncode != 0 and "permission denied" in refused.stderr
        # The writer changes rows, never the schema.
        writer = [*psql, "-U", "tapeline_writer", "-d", "tapeline", "-c"]
        run(*writer, "INSERT INTO trades VALUES (1)")
        dropped = subprocess.run(
            [*prefix, *writer, "DROP TABLE trades"],
            capture_output=True, text=True, timeout=30, check=False, cwd=cluster_dir,
        )  # fmt: skip
        assert dropped.returncode != 0 and "must be owner" in dropped.stderr
    finally:
        if (data / "postmaster.pid").exists():
            run(*pg_ctl, "-m", "immediate", "-w", "stop")


def test_applications_use_mongodb_as_a_non_root_user(services: dict[str, dict[str, Any]]) -> None:
    """The compose init script creates `tapeline` with readWrite on its database alone;
    the worker connects as it, never as the root user. The script runs in node with the
    two objects it uses standing in for mongosh's."""
    mongo = environment(services["mongo"])
    url = environment(services["worker"])["TAPELINE_MONGO_URL"]  # ${...:?...} holds a "?"
    assert url.startswith("mongodb://tapeline:"), url
    assert mongo["MONGO_INITDB_ROOT_USERNAME"] != "tapeline"
    assert url.endswith("@mongo:27017/tapeline?authSource=tapeline"), url
    assert ("./compose/mongo", "/docker-entrypoint-initdb.d", "ro") in bind_mounts(
        services["mongo"]
    )
    harness = """
    const made = [];
    const app = {getUser: () => null, createUser: (u) => made.push(u)};
    globalThis.db = {getSiblingDB: (name) => { if (name !== "tapeline") throw name; return app; }};
    process.env.MONGO_PASSWORD = "p@ss:w/rd%";
    require(process.argv[1]);
    console.log(JSON.stringify(made));
    """
    script = ROOT / "compose" / "mongo" / "10-app-user.js"
    node = shutil.which("node")
    assert node, "node is needed (scripts/bootstrap.sh installs nodejs)"
    out = subprocess.run(
        [node, "-e", harness, str(script)], capture_output=True, text=True, timeout=30, check=True
    )
    only_its_database = [{"role": "readWrite", "db": "tapeline"}]
    assert json.loads(out.stdout) == [
        {"user": "tapeline", "pwd": "p@ss:w/rd%", "roles": only_its_database}
    ]


def test_kafka_ui_asks_for_a_login(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka-ui"])
    assert env["AUTH_TYPE"] == "LOGIN_FORM"
    assert REQUIRED_REF.match(env["SPRING_SECURITY_USER_PASSWORD"])
    # the healthcheck's path is on kafka-ui's list of pages open without a login
    assert "/actuator/health" in " ".join(services["kafka-ui"]["healthcheck"]["test"])
