"""The layout: what each folder may import, no import cycle, and an SDK that loads no server."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "adapters", "projections", "bus", "hero_deployer")

# hero_deployer's folders: application services, the SDK and the two entry points
FOLDERS = ("hero_deployer.app", "hero_deployer.sdk", "hero_deployer.cli", "hero_deployer.web")

# What each folder may import besides itself and the `hero_deployer` package (docs/architecture.md)
RULES: dict[str, set[str]] = {
    "core": set(),
    "adapters": {"core", "projections"},
    "projections": {"core"},
    "bus": {"core"},
    "app": {"core", "adapters", "projections", "bus", "sdk"},
    "sdk": {"core"},
    "cli": {"core", "sdk", "app", "web"},
    "web": {"core", "sdk"},
}
# The one edge past a rule: the dashboard keeps its session key in a 0600 file of its own
EXCEPTIONS = {("hero_deployer.web.sessions", "adapters.keyfiles")}


def folder(module: str) -> str:
    """The folder whose rule `module` follows."""
    top = module.split(".")[0]
    if top != "hero_deployer":
        return top
    if module == "hero_deployer.__main__":
        return "cli"
    for prefix in FOLDERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix.rsplit(".", 1)[1]
    return "package" if module == "hero_deployer" else "loose"


def modules() -> dict[str, Path]:
    """Every module of the five packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (never run: no import happens there)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours `path` imports when it runs, at the top or lazily (in a function)."""
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                yield name


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(path, known)) - {name} for name, path in known.items()}


def test_every_folder_imports_only_what_its_rule_allows() -> None:
    broken = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if folder(target) not in {folder(source), "package", *RULES[folder(source)]}
        and (source, target) not in EXCEPTIONS
    )
    assert broken == []


def test_hero_deployer_holds_only_its_folders_and_every_folder_has_a_rule() -> None:
    assert {folder(name) for name in modules()} - {"package"} == set(RULES)


def test_no_module_imports_another_that_imports_it_back() -> None:
    try:
        tuple(TopologicalSorter(graph()).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_the_cycle_check_sees_a_lazy_import_and_not_a_type_checking_one(tmp_path: Path) -> None:
    known = {"core.a": tmp_path / "a.py", "core.b": tmp_path / "b.py"}
    known["core.a"].write_text("import core.b\n")
    known["core.b"].write_text("def f():\n    from core.a import g\n")
    edges = {name: set(imports(path, known)) for name, path in known.items()}
    with pytest.raises(CycleError):
        tuple(TopologicalSorter(edges).static_order())
    known["core.b"].write_text("if TYPE_CHECKING:\n    from core.a import g\nelse:\n    g = 1\n")
    assert set(imports(known["core.b"], known)) == set()


SERVER = ("aiosqlite", "sqlite3", "asyncssh", "httpx", "adapters", "projections", "bus")


@pytest.mark.parametrize("module", ["hero_deployer.sdk.client", "hero_deployer.sdk.asyncapi"])
def test_the_sdk_loads_no_database_adapter_projection_or_bus(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert module in loaded
    server = [m for m in loaded if m.split(".")[0] in SERVER]
    ours = [m for m in loaded if m.split(".")[0] == "hero_deployer" and folder(m) == "app"]
    assert server == [] and ours == []


def test_the_console_script_runs_the_cli() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["hero-deployer"] == "hero_deployer.cli:main"
    out = subprocess.run(
        [sys.executable, "-m", "hero_deployer", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("hero-deployer ")
