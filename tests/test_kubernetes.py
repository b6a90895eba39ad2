"""Checks deployments/kubernetes without a cluster, kustomize or Helm.

No cluster runs here, so the manifests are validated by reading them:

- the derived files (``KafkaTopic``s, ``PrometheusRule``) equal a fresh
  ``python -m deployments.kubernetes`` render, and say what the code and the rules file say;
- every core Kubernetes resource (Namespace, Secret, ServiceAccount, Deployment, Service,
  Job, the generated ConfigMap, and the Job the work pool's base job template becomes once
  Prefect fills it in) validates against the Kubernetes OpenAPI schema of
  ``KUBERNETES_VERSION`` with ``kubernetes-validate`` in strict mode (unknown fields fail);
- the resources of operators (Strimzi, CloudNativePG, the MongoDB Community Operator, the
  Prometheus Operator) are checked structurally only: apiVersion, kind and the fields we
  rely on. Their CRD schemas are not available offline, so a field the operator would
  reject can still pass here;
- the kustomization lists every manifest file of the directory, and every file it lists
  exists (``kustomize build`` cannot run here);
- Secrets hold placeholders only, and everything that reads a Secret names one that exists.

Nothing here proves the manifests run: that needs a cluster with the operators.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import prefect
import pytest
import yaml
from prefect.utilities.templating import apply_values

from deployments import kubernetes as k8s
from stack.services import PREFECT_SERVER_TUNING
from tasks.core import topics

KUBERNETES_VERSION = "1.31"
DIR = k8s.HERE
KUSTOMIZATION = yaml.safe_load((DIR / "kustomization.yaml").read_text())
JOB_TEMPLATE = json.loads((DIR / "work-pool" / "base-job-template.json").read_text())
HELM_VALUES = {p.name: yaml.safe_load(p.read_text()) for p in sorted((DIR / "helm").glob("*.yaml"))}
APP_IMAGE = "tapeline/app:0.1.0"
# Secrets an operator writes, not us: the MongoDB user's connection string.
OPERATOR_SECRETS = {"tapeline-mongo-uri": {"connectionString.standard"}}


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources() -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` would send, before kustomize's namespace is set."""
    docs = [d for f in KUSTOMIZATION["resources"] for d in load(DIR / f)]
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, rel = entry.rpartition("=")
            data[key or Path(rel).name] = (DIR / rel).read_text()
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return docs


def flow_run_job(**values: Any) -> dict[str, Any]:
    """The Job manifest a Kubernetes worker starts from, filled in by Prefect's own templating
    with the template's defaults (the worker adds labels, env and args to it afterwards)."""
    props = JOB_TEMPLATE["variables"]["properties"]
    defaults = {k: p["default"] for k, p in props.items() if "default" in p}
    filled = {**defaults, "name": "drain-prices-abc", "labels": {}, "env": {}, **values}
    job = apply_values(copy.deepcopy(JOB_TEMPLATE["job_configuration"]), filled)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    if isinstance(container.get("args"), str):  # as the worker does with a command string
        container["args"] = shlex.split(container["args"])
    return job


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in resources() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# ---- derived files -----------------------------------------------------------------------


def test_derived_files_equal_a_fresh_render() -> None:
    for path, text in k8s.render().items():
        assert path.read_text() == text, f"run `python -m deployments.kubernetes`: {path}"


def test_prometheus_rule_holds_the_rules_file_groups() -> None:
    rules = yaml.safe_load(k8s.RULES_FILE.read_text())["groups"]
    (rule,) = of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == rules
    assert {r["alert"] for g in rules for r in g["rules"] if "alert" in r} >= {
        "TapelineTargetDown",
        "TapelineConsumerLagGrowing",
    }


def test_kafka_topics_are_the_topics_of_the_code() -> None:
    found = {
        t["spec"]["topicName"]: t
        for t in of_kind("KafkaTopic")
        if t["metadata"]["labels"]["strimzi.io/cluster"] == "tapeline"
    }
    assert set(found) == {spec.name for spec in topics.TOPICS}
    assert len(found) == len(of_kind("KafkaTopic"))
    for spec in topics.TOPICS:
        topic = found[spec.name]
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", topic["metadata"]["name"])
        assert topic["spec"]["partitions"] == int(k8s.config.DEFAULTS["TAPELINE_TOPIC_PARTITIONS"])
        assert topic["spec"]["replicas"] == 3
        config = topic["spec"]["config"]
        assert config == topics.topic_configs(spec, k8s.CLUSTER_TOPICS)
        hours = spec.retention_hours or int(k8s.config.DEFAULTS["TAPELINE_TOPIC_RETENTION_HOURS"])
        assert config["retention.ms"] == str(hours * 3_600_000)
        assert config["cleanup.policy"] == ("compact" if spec.compact else "delete")
        assert config["min.insync.replicas"] == "2"
    assert found[topics.QUOTES]["spec"]["config"]["retention.ms"] == str(24 * 3_600_000)


# ---- core resources against the Kubernetes schema -----------------------------------------

CORE_KINDS = {"Namespace", "Secret", "ServiceAccount", "ConfigMap", "Deployment", "Service", "Job"}


def core_resources() -> list[dict[str, Any]]:
    docs = [d for d in resources() if d["kind"] in CORE_KINDS]
    job = flow_run_job(command="prefect flow-run execute")
    # Prefect's worker insists on parallelism/completions inside the pod spec (its default
    # template has them there, and it refuses a template without them); Kubernetes drops them.
    for key in ("parallelism", "completions"):
        del job["spec"]["template"]["spec"][key]
    return [*docs, job]


def test_every_core_kind_is_covered() -> None:
    assert {d["kind"] for d in core_resources()} == CORE_KINDS
    operator_kinds = {d["kind"] for d in resources()} - CORE_KINDS
    assert operator_kinds == set(STRUCTURE)


@pytest.mark.parametrize(
    "doc", core_resources(), ids=lambda d: f"{d['kind']}/{d['metadata'].get('name', 'flow-run')}"
)
def test_core_resource_validates_against_kubernetes_schema(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {e.message} at {list(e.path)}")


# ---- operator resources, structurally -------------------------------------------------------

# kind -> (apiVersion, paths that must hold a value)
STRUCTURE: dict[str, tuple[str, tuple[str, ...]]] = {
    "Kafka": (
        "kafka.strimzi.io/v1beta2",
        ("spec.kafka.listeners", "spec.kafka.config", "spec.entityOperator.topicOperator"),
    ),
    "KafkaNodePool": ("kafka.strimzi.io/v1beta2", ("spec.replicas", "spec.roles", "spec.storage")),
    "KafkaTopic": ("kafka.strimzi.io/v1beta2", ("spec.topicName", "spec.partitions")),
    "Cluster": ("postgresql.cnpg.io/v1", ("spec.instances", "spec.storage.size")),
    "Database": ("postgresql.cnpg.io/v1", ("spec.name", "spec.owner", "spec.cluster.name")),
    "MongoDBCommunity": (
        "mongodbcommunity.mongodb.com/v1",
        ("spec.members", "spec.type", "spec.version", "spec.security.authentication.modes"),
    ),
    "ServiceMonitor": ("monitoring.coreos.com/v1", ("spec.selector", "spec.endpoints")),
    "PodMonitor": ("monitoring.coreos.com/v1", ("spec.selector", "spec.podMetricsEndpoints")),
    "PrometheusRule": ("monitoring.coreos.com/v1", ("spec.groups",)),
}


MISSING = object()


def at(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node.get(part, MISSING) if isinstance(node, dict) else MISSING
    return node


@pytest.mark.parametrize(
    "doc",
    [d for d in resources() if d["kind"] in STRUCTURE],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_operator_resource_has_what_its_operator_needs(doc: dict[str, Any]) -> None:
    api_version, paths = STRUCTURE[doc["kind"]]
    assert doc["apiVersion"] == api_version
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"])
    for path in paths:
        assert at(doc, path) is not MISSING, path
    assert "namespace" not in doc["metadata"]  # kustomization.yaml sets it


def test_kafka_is_kraft_with_three_brokers_and_its_exporter() -> None:
    kafka = named("Kafka", k8s.KAFKA_CLUSTER)
    (pool,) = of_kind("KafkaNodePool")
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER
    assert pool["spec"]["replicas"] == 3 and set(pool["spec"]["roles"]) == {"broker", "controller"}
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    config = kafka["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2 and config["default.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False
    assert any(li["port"] == 9092 for li in kafka["spec"]["kafka"]["listeners"])
    assert "kafkaExporter" in kafka["spec"]


def test_kafka_runs_the_version_of_compose_and_the_local_stack() -> None:
    """One Kafka version everywhere: the Strimzi cluster, compose's image and the jars
    the local stack (and so every test) runs."""
    kafka = named("Kafka", k8s.KAFKA_CLUSTER)["spec"]["kafka"]["version"]
    root = DIR.parent.parent
    pom = re.search(r"<kafka.version>([^<]+)<", (root / "stack" / "pom.xml").read_text())
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    image = compose["services"]["kafka"]["image"]
    assert pom is not None and kafka == pom[1] and image == f"apache/kafka:{kafka}"


def test_postgres_and_mongo_are_replicated_with_secret_credentials() -> None:
    (pg,) = of_kind("Cluster")
    assert pg["spec"]["instances"] == 3
    roles = {r["name"]: r["passwordSecret"]["name"] for r in pg["spec"]["managed"]["roles"]}
    assert set(roles) == {"tapeline_writer", "tapeline_reader", "prefect"}
    assert pg["spec"]["bootstrap"]["initdb"]["secret"]["name"] == "tapeline-pg-owner"
    (mongo,) = of_kind("MongoDBCommunity")
    assert mongo["spec"]["members"] == 3 and mongo["spec"]["type"] == "ReplicaSet"
    for user in mongo["spec"]["users"]:
        assert user["passwordSecretRef"]["name"] and user["scramCredentialsSecretName"]
        assert user["roles"]
    app = [u for u in mongo["spec"]["users"] if u["name"] == "tapeline"]
    assert app[0]["roles"] == [{"name": "readWrite", "db": "tapeline"}]
    assert app[0]["connectionStringSecretName"] in OPERATOR_SECRETS


def test_monitors_scrape_what_compose_scrapes() -> None:
    """Each ServiceMonitor finds one Service with its port; the job label Prometheus gives a
    ServiceMonitor's targets is the Service's name, so the jobs are compose's jobs."""
    services = of_kind("Service")
    jobs = set()
    for monitor in of_kind("ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        jobs.add(service["metadata"]["name"])
    compose = yaml.safe_load((k8s.ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    assert jobs == {c["job_name"] for c in compose["scrape_configs"]} - {"prometheus"}
    assert named("ServiceMonitor", "pushgateway")["spec"]["endpoints"][0]["honorLabels"]


def test_services_select_their_pods() -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in of_kind("Deployment")}
    for name in ("tapeline-exporter", "pushgateway"):
        service, pod = named("Service", name)["spec"], pods[name]
        assert service["selector"].items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["ports"]} <= ports
    # Ingestion runs as a flow-run Job: the worker labels its pods with the flow's name.
    from flows.ingest import ingest

    ingest_service = named("Service", "tapeline-ingest")
    assert ingest_service["spec"]["selector"] == {"prefect.io/flow-name": ingest.name}
    job_ports = flow_run_job()["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["containerPort"] for p in job_ports} == {ingest_service["spec"]["ports"][0]["port"]}


# ---- the work pool's base job template ------------------------------------------------------


def test_flow_runs_are_jobs_without_pod_retries() -> None:
    job = flow_run_job()
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["image"] == APP_IMAGE
    # What Prefect's Kubernetes worker refuses to run without (its _get_base_job_manifest).
    assert pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["name"] == "prefect-job"
    variables = JOB_TEMPLATE["variables"]["properties"]
    used = re.findall(r"{{\s*(\w+)\s*}}", json.dumps(JOB_TEMPLATE["job_configuration"]))
    assert set(used) <= set(variables)


def test_the_worker_chart_and_the_setup_job_read_the_committed_template() -> None:
    worker = HELM_VALUES["prefect-worker.yaml"]["worker"]
    name = worker["config"]["baseJobTemplate"]["existingConfigMapName"]
    assert json.loads(named("ConfigMap", name)["data"]["baseJobTemplate.json"]) == JOB_TEMPLATE
    assert worker["config"]["type"] == "kubernetes" and worker["config"]["workPool"] == "tapeline"
    volumes = named("Job", "tapeline-setup")["spec"]["template"]["spec"]["volumes"]
    assert name in {v["configMap"]["name"] for v in volumes if "configMap" in v}


# ---- secrets ----------------------------------------------------------------------------------

SECRET_ENV = re.compile(r"PASSWORD|AUTH_STRING|MONGO_URL|TOKEN")


def env_lists() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for doc in [*resources(), flow_run_job(), *HELM_VALUES.values()]:
        where = doc.get("metadata", {}).get("name") or doc.get("kind", "helm values")
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("env"), list):
                yield where, node["env"]


def test_credentials_come_from_secrets_only() -> None:
    seen = 0
    for where, env in env_lists():
        for var in env:
            if SECRET_ENV.search(var["name"]):
                seen += 1
                assert "secretKeyRef" in var.get("valueFrom", {}), f"{where}: {var['name']}"
            if "value" in var:
                # A URL may carry a password only through $(VAR) expansion of a Secret.
                assert not re.search(r"://[^:/@]+:(?!\$\()[^@]+@", str(var["value"])), where
    assert seen >= 10


def test_every_secret_reference_names_a_secret_with_that_key() -> None:
    keys = {
        s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {}))
        for s in of_kind("Secret")
    } | OPERATOR_SECRETS
    refs: list[tuple[str, str]] = []
    for doc in [*resources(), flow_run_job(), *HELM_VALUES.values()]:
        for node in walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if isinstance(node, dict) and isinstance(node.get("passwordSecret"), dict):
                refs.append((node["passwordSecret"]["name"], "password"))
            if isinstance(node, dict) and isinstance(node.get("passwordSecretRef"), dict):
                refs.append((node["passwordSecretRef"]["name"], node["passwordSecretRef"]["key"]))
    server = HELM_VALUES["prefect-server.yaml"]
    refs.append((server["server"]["basicAuth"]["existingSecret"], "auth-string"))
    db = server["externalDatabase"]
    refs += [(db["existingSecret"], db[k]) for k in ("usernameSecretKey", "passwordSecretKey")]
    worker = HELM_VALUES["prefect-worker.yaml"]["worker"]["selfHostedServerApiConfig"]
    refs.append((worker["basicAuth"]["existingSecret"], "auth-string"))
    assert len(refs) > 15
    for name, key in refs:
        assert key in keys.get(name, set()), f"secret {name} has no key {key}"


def test_prefect_server_cleans_up_cancelled_runs_as_the_local_stack_does() -> None:
    env = {e["name"]: e.get("value") for e in HELM_VALUES["prefect-server.yaml"]["server"]["env"]}
    key = "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS"
    assert env[key] == PREFECT_SERVER_TUNING[key]


def test_secrets_are_placeholders() -> None:
    for secret in of_kind("Secret"):
        assert "data" not in secret, "committed secrets are templates in stringData"
        for key, value in secret["stringData"].items():
            if key != "username":
                assert "CHANGE-ME" in value, f"{secret['metadata']['name']}.{key}"
            assert re.fullmatch(r"[A-Za-z0-9_:-]+", value), "a value a URL can carry unencoded"


def test_app_images_are_the_project_image() -> None:
    for doc in [*of_kind("Deployment"), *of_kind("Job")]:
        spec = doc["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            if not c["image"].startswith("prom/"):
                assert c["image"] == APP_IMAGE, doc["metadata"]["name"]
    # The charts run the Prefect version the project pins.
    server_tag = HELM_VALUES["prefect-server.yaml"]["global"]["prefect"]["image"]["prefectTag"]
    worker_tag = HELM_VALUES["prefect-worker.yaml"]["worker"]["image"]["prefectTag"]
    for tag in (server_tag, worker_tag):
        assert tag.startswith(f"{prefect.__version__}-python3.11")


# ---- the kustomization ------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_nothing_missing() -> None:
    listed = set(KUSTOMIZATION["resources"])
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        listed |= {f.rpartition("=")[2] for f in gen["files"]}
    on_disk = {
        str(p.relative_to(DIR))
        for p in DIR.rglob("*")
        if p.suffix in {".yaml", ".yml", ".json"}
        and p.parts[len(DIR.parts)] != "helm"  # Helm values: read by helm, not kustomize
        and p.name != "kustomization.yaml"
    }
    assert listed == on_disk
    assert len(KUSTOMIZATION["resources"]) == len(listed - {"work-pool/base-job-template.json"})
    assert KUSTOMIZATION["namespace"] == named("Namespace", "tapeline")["metadata"]["name"]
