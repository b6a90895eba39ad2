"""Dashboards and alert rules against the code: every query names a metric Tapeline
exports, every dashboard is a well-formed Grafana dashboard wired to a provisioned
datasource, and promtool accepts and passes the rules.

A renamed metric or a typo in a query would otherwise show up as an empty panel or an
alert that can never fire, which nothing else notices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tasks.core import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"
GRAFANA_DIR = ROOT / "monitoring" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# Series Prometheus or the Pushgateway make themselves, not Tapeline's code.
BUILT_IN = {"up", "push_time_seconds", "push_failure_time_seconds"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
MATCHERS = re.compile(r"\{[^{}]*\}")
RANGE = re.compile(r"\[[^\[\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")
GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)")
# Grafana's own variables and macros, usable without a definition in the dashboard.
GRAFANA_BUILT_INS = {"__rate_interval", "__interval", "__range", "__timeFilter", "__timeFrom",
                     "__timeTo", "__unixEpochFilter", "__unixEpochFrom", "__unixEpochTo",
                     "__timeGroup", "__timeGroupAlias", "__all"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions and labels left out)."""
    text = STRING.sub('""', expr)
    text = MATCHERS.sub("", text)
    text = RANGE.sub("", text)
    text = GROUPING.sub("", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def exported_names() -> set[str]:
    """Every series name the code exports, with the suffixes the exposition adds."""
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, (MetricWrapperBase, metrics.Tally)):
            for family in value.describe():
                names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def load_dashboards() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in DASHBOARD_FILES]


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels, including those nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def provisioned_datasources() -> dict[str, str]:
    path = GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {source["uid"]: source["type"] for source in config["datasources"]}


def prometheus_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every Prometheus query in the dashboards and rule files."""
    queries = []
    prometheus_uids = {u for u, t in provisioned_datasources().items() if t == "prometheus"}
    for name, dashboard in load_dashboards():
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                if target["datasource"]["uid"] in prometheus_uids:
                    queries.append((f"{name}: {panel['title']}", target["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable.get("datasource", {}).get("uid") in prometheus_uids:
                query = variable["definition"]
                inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
                queries.append((f"{name}: ${variable['name']}", inner.group(1) if inner else query))
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                where = f"{path.name}: {rule.get('alert') or rule.get('record')}"
                queries.append((where, rule["expr"]))
    return queries


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, venue) (rate(tapeline_event_to_ack_seconds_bucket"
        '{venue=~"$venue", job="x"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"tapeline_event_to_ack_seconds_bucket"}
    assert metric_names("time() - max by (venue) (a_timestamp) > 30") == {"a_timestamp"}
    assert metric_names("x:sum > 1000 and deriv(x:sum[10m]) > 0") == {"x:sum"}
    assert metric_names('sum(a_total) or vector(0) unless on (job) up{job="inf"}') == {
        "a_total", "up",
    }  # fmt: skip
    assert metric_names("rate(a_total[5m] offset 1h) / ignoring (x) b_total") == {
        "a_total", "b_total",
    }  # fmt: skip


def test_every_query_names_an_exported_metric() -> None:
    known = exported_names() | recorded_names() | BUILT_IN
    queries = prometheus_queries()
    assert len(queries) > 20
    unknown = []
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown += [f"{where}: {n}" for n in sorted(names - known)]
    assert not unknown, "queries name metrics nobody exports:\n" + "\n".join(unknown)


def test_every_metric_is_on_a_dashboard() -> None:
    shown = set()
    for where, expr in prometheus_queries():
        if not where.startswith(tuple(p.name for p in RULE_FILES)):
            shown |= metric_names(expr)
    missing = []
    for value in vars(metrics).values():
        if isinstance(value, (MetricWrapperBase, metrics.Tally)):
            family = next(iter(value.describe()))
            if not {family.name + s for s in SUFFIXES[family.type]} & shown:
                missing.append(family.name)
    assert not missing, f"metrics no dashboard shows: {missing}"


# Grafana's dashboard JSON model, the parts Grafana needs to load a provisioned file.
# (No schema for it is published as a Python package; the model is documented at
# grafana.com/docs/grafana/latest/dashboards/build-dashboards/view-dashboard-json-model/.)
DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"type": "string"}, "uid": {"type": "string", "minLength": 1}},
}
GRID_POS = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
PROMETHEUS_TARGET = {
    "type": "object",
    "required": ["refId", "datasource", "expr"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "datasource": DATASOURCE_REF,
        "expr": {"type": "string", "minLength": 1},
        "legendFormat": {"type": "string"},
        "instant": {"type": "boolean"},
        "range": {"type": "boolean"},
    },
}
SQL_TARGET = {
    "type": "object",
    "required": ["refId", "datasource", "rawSql", "format", "rawQuery", "editorMode"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "datasource": DATASOURCE_REF,
        "rawSql": {"type": "string", "minLength": 1},
        "format": {"enum": ["time_series", "table"]},
        "rawQuery": {"const": True},
        "editorMode": {"const": "code"},
    },
}
PANEL_TYPES = ["row", "timeseries", "stat", "table", "bargauge", "gauge", "candlestick", "text"]
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": PANEL_TYPES},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "gridPos": GRID_POS,
        "datasource": DATASOURCE_REF,
        "targets": {"type": "array", "items": {"oneOf": [PROMETHEUS_TARGET, SQL_TARGET]}},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {
                "defaults": {"type": "object"},
                "overrides": {"type": "array"},
            },
        },
        "options": {"type": "object"},
        "collapsed": {"type": "boolean"},
        "panels": {"type": "array"},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"required": ["collapsed", "panels"]},
    "else": {"required": ["datasource", "targets", "fieldConfig", "options"]},
}
VARIABLE = {
    "type": "object",
    "required": ["name", "type"],
    "properties": {
        "name": {"type": "string", "pattern": r"^\w+$"},
        "type": {"enum": ["query", "custom", "constant", "interval", "datasource", "textbox"]},
        "datasource": DATASOURCE_REF,
        "definition": {"type": "string"},
        "refresh": {"enum": [0, 1, 2]},
        "multi": {"type": "boolean"},
        "includeAll": {"type": "boolean"},
    },
    "if": {"properties": {"type": {"const": "query"}}},
    "then": {"required": ["datasource", "query", "definition", "refresh"]},
}
DASHBOARD = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating", "tags"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        # Grafana migrates older models on load; 36 is where datasource refs became objects.
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "refresh": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": VARIABLE}},
        },
        "annotations": {"type": "object"},
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
    # A dashboard file with an `id` would collide with the database's on provisioning.
    "not": {"required": ["id"]},
}


@pytest.fixture(scope="module")
def dashboards() -> list[tuple[str, dict[str, Any]]]:
    assert {p.name for p in DASHBOARD_FILES} == {"tapeline-pipeline.json", "tapeline-market.json"}
    return load_dashboards()


def test_dashboards_match_grafanas_json_model(dashboards) -> None:
    jsonschema.Draft202012Validator.check_schema(DASHBOARD)
    validator = jsonschema.Draft202012Validator(DASHBOARD)
    for name, dashboard in dashboards:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in
                  validator.iter_errors(dashboard)]  # fmt: skip
        assert not errors, f"{name}:\n" + "\n".join(errors)
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                assert target["datasource"] == panel["datasource"], f"{name}: {panel['title']}"


def test_dashboard_uids_titles_and_panel_ids_are_unique(dashboards) -> None:
    assert len({d["uid"] for _, d in dashboards}) == len(dashboards)
    assert {d["title"] for _, d in dashboards} == {"Tapeline pipeline", "Tapeline market"}
    for name, dashboard in dashboards:
        ids = [panel["id"] for panel in all_panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in all_panels(dashboard):
            refs = [t["refId"] for t in panel.get("targets", [])]
            assert len(refs) == len(set(refs)), f"{name}: {panel['title']}: duplicate refId"


def test_panels_fit_the_grid_without_overlapping(dashboards) -> None:
    for name, dashboard in dashboards:
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {panel['title']} is wider than the grid"
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    other = cells.setdefault((x, y), panel["title"])
                    assert other == panel["title"], f"{name}: {panel['title']} overlaps {other}"


def test_datasources_are_the_provisioned_ones(dashboards) -> None:
    provisioned = provisioned_datasources()
    used = set()
    for name, dashboard in dashboards:
        refs = [p["datasource"] for p in all_panels(dashboard) if "datasource" in p]
        refs += [t["datasource"] for p in all_panels(dashboard) for t in p.get("targets", [])]
        refs += [v["datasource"] for v in dashboard["templating"]["list"] if "datasource" in v]
        for ref in refs:
            assert ref["uid"] in provisioned, f"{name}: unknown datasource uid {ref['uid']}"
            assert provisioned[ref["uid"]] == ref["type"], f"{name}: {ref} has the wrong type"
            used.add(ref["uid"])
    assert used == set(provisioned), "a provisioned datasource is on no dashboard"


def test_variables_used_are_defined(dashboards) -> None:
    for name, dashboard in dashboards:
        defined = {v["name"] for v in dashboard["templating"]["list"]}
        text = json.dumps(dashboard["panels"]) + json.dumps(dashboard["templating"])
        used = set(GRAFANA_VARIABLE.findall(text)) - GRAFANA_BUILT_INS
        assert used <= defined, f"{name}: undefined variables {used - defined}"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        msg = "promtool not installed (Debian package 'prometheus'; scripts/bootstrap.sh)"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return found


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_rules() -> None:
    out = run_promtool("check", "rules", *(str(p) for p in RULE_FILES))
    assert "SUCCESS" in out


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    out = run_promtool("test", "rules", *(str(p) for p in RULE_TESTS))
    assert "SUCCESS" in out
    alerts = {
        rule["alert"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for case in test.get("alert_rule_test", []):
                if case["exp_alerts"]:  # a case that expects it to fire, not only silence
                    tested.add(case["alertname"])
    assert alerts <= tested, f"alerts without a firing test: {alerts - tested}"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Prometheus' own parser, through promtool: each query as a recording rule."""
    rules = []
    for i, (where, expr) in enumerate(prometheus_queries()):
        if where.endswith((".yml",)) or ".yml:" in where:
            continue
        concrete = expr.replace("$__rate_interval", "1m").replace("$venue", ".*")
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert "SUCCESS" in run_promtool("check", "rules", str(path))


MIGRATIONS = ROOT / "tasks" / "drain" / "migrations"
# Grafana's SQL macros and this dashboard's variables, as Grafana would expand them.
SQL_EXPANSIONS = {
    "$__unixEpochFrom()": "1700000000",
    "$__unixEpochTo()": "1700003600",
    "$venue": "binance",
    "$symbol": "BTC-USDT",
    "$interval": "1m",
}


def test_market_queries_run_on_the_drain_schema(pg_conn) -> None:
    """Each SQL query of the dashboards, planned by PostgreSQL on the drains' own tables
    (their migrations applied in a private schema), so a renamed table or column fails
    here and not as an empty panel."""
    files = sorted(MIGRATIONS.glob("*.sql"))
    assert files, f"no drain migrations in {MIGRATIONS.relative_to(ROOT)}"
    queries = []
    for name, dashboard in load_dashboards():
        sources = [p.get("targets", []) for p in all_panels(dashboard)]
        sources.append([v for v in dashboard["templating"]["list"] if v["type"] == "query"])
        for targets in sources:
            for target in targets:
                sql = target.get("rawSql") or (
                    target["query"] if target.get("datasource", {}).get("type", "").startswith(
                        "grafana-postgresql") else None
                )  # fmt: skip
                if sql:
                    for macro, value in SQL_EXPANSIONS.items():
                        sql = sql.replace(macro, value)
                    queries.append((name, sql))
    assert len(queries) >= 8
    schema = f"test_{os.getpid()}_{id(queries)}"
    pg_conn.autocommit = True
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
        try:
            cur.execute(f"SET search_path = {schema}")
            for path in files:
                cur.execute(path.read_text(encoding="utf-8"))
            for name, sql in queries:
                assert "$" not in sql, f"{name}: unexpanded variable in {sql}"
                cur.execute(f"EXPLAIN {sql}")
        finally:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
