"""The layout is the architecture: these rules keep the folders telling the truth.

- ``tasks/core`` imports nothing else of ours; ``tasks/venues`` only ``core``;
- the stages (``ingest``, ``drain``, ``analytics``, ``telemetry``, ``books``) only
  ``core`` and ``venues``; ``ingest`` also ``books`` (it keeps books verified through
  the book stage's sync machines before publishing them); ``history`` also the stages
  it deliberately reuses: ingestion's publish path (backfilled trades reach Kafka exactly
  like live ones), the drain's sinks (replay) and the candle store (venue klines);
- ``tasks`` never imports ``flows``, ``deployments``, ``blocks``, ``stack`` or ``simulator``;
- nothing imports ``flows`` except ``deployments`` (and tests);
- venue modules are reached through the registry, never imported by the stages or flows;
- one settings reader: only ``tasks/core/config.py`` reads ``TAPELINE_*`` variables.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("tasks", "flows", "deployments", "blocks", "stack", "simulator", "bench")
STAGES = ("ingest", "drain", "analytics", "telemetry", "books")
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "venues": {"core", "venues"},
    **{stage: {"core", "venues", stage} for stage in STAGES},
    "ingest": {"core", "venues", "ingest", "books"},
    "history": {"core", "venues", "history", "ingest", "drain", "analytics"},
}
VENUE_MODULES = {
    "tasks.venues.binance",
    "tasks.venues.coinbase",
    "tasks.venues.deribit",
    "tasks.venues.finnhub",
    "tasks.venues.kraken",
}


def sources(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module an absolute import in ``path`` names (in functions too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:  # `from tasks import venues` names a module too
                yield node.lineno, f"{node.module}.{alias.name}"


def ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_the_tasks_packages_are_the_pipeline_stages() -> None:
    packages = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "a new package under tasks/ needs its layering rule here"
    loose = [p.name for p in (ROOT / "tasks").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "every module belongs to a stage package"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_tasks_package_imports_only_the_layers_below_it(package: str) -> None:
    bad = []
    for path in sources(f"tasks/{package}"):
        for line, module in imports(path):
            if not ours(module):
                continue
            parts = module.split(".")
            if module == "tasks":  # `from tasks import venues` is checked by its name
                continue
            if parts[0] != "tasks" or len(parts) < 2 or parts[1] not in ALLOWED[package]:
                bad.append(f"{where(path, line)} imports {module}")
    assert bad == []


def test_only_deployments_import_flows() -> None:
    bad = [
        f"{where(path, line)} imports {module}"
        for path in sources("tasks", "blocks", "stack", "simulator", "bench")
        for line, module in imports(path)
        if module.split(".")[0] == "flows"
    ]
    assert bad == []


def test_venue_modules_are_reached_through_the_registry() -> None:
    bad = [
        f"{where(path, line)} imports {module}"
        for path in sources("tasks", "flows", "deployments", "blocks")
        if "venues" not in path.relative_to(ROOT).parts
        for line, module in imports(path)
        if module in VENUE_MODULES
    ]
    assert bad == []


def _reads_tapeline_variable(node: ast.AST) -> bool:
    """``os.environ.get("TAPELINE_…")``, ``os.getenv(…)`` or ``os.environ["TAPELINE_…"]``."""

    def is_tapeline(arg: ast.AST | None) -> bool:
        return isinstance(arg, ast.Constant) and str(arg.value).startswith("TAPELINE_")

    if isinstance(node, ast.Call) and node.args and is_tapeline(node.args[0]):
        name = ast.unparse(node.func)
        return name in ("os.environ.get", "os.getenv", "environ.get", "getenv")
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
        return ast.unparse(node.value) in ("os.environ", "environ") and is_tapeline(node.slice)
    return False


def test_one_settings_reader() -> None:
    reader = ROOT / "tasks" / "core" / "config.py"
    bad = [
        where(path, node.lineno)
        for path in sources(*OURS)
        if path != reader
        for node in ast.walk(ast.parse(path.read_text()))
        if _reads_tapeline_variable(node)
    ]
    assert bad == [], "read settings through tasks.core.config"


def test_no_reference_to_files_outside_the_repository() -> None:
    outside = ("../" + "shared", "PREFECT-" + "NOTES", "DESIGN" + ".md")
    tracked = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and not {".git", ".venv", ".tapeline", "__pycache__"} & set(p.relative_to(ROOT).parts)
        and p.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".json", ".sql", ""}
    ]
    bad = [
        f"{p.relative_to(ROOT)} mentions {word}"
        for p in tracked
        for word in outside
        if word in p.read_text(errors="replace")
    ]
    assert bad == []
