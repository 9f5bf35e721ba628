"""Counts, per operation, the source files outside tests/ and adapters/ that name the operation.

A file names an operation when its syntax tree holds a string constant equal to the name, a
function or method defined with the name, or a call `x.name(...)` whose `x` is not a builtin
container literal. An ordinary word (`events`, `health`) used as a variable, a keyword or in
prose does not count. Prints a table (name, files) and the files of any name over the limit:

    .venv/bin/python -m bench.op_names            # bench/ counts too
    .venv/bin/python -m bench.op_names --no-bench
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.registry import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 3
SKIPPED = frozenset({"tests", "adapters", ".venv", "build", "dist", ".git"})
_CONTAINERS = (ast.Dict, ast.List, ast.Set, ast.Tuple, ast.DictComp, ast.ListComp, ast.SetComp)


def source_files(*, bench: bool = True) -> Iterator[Path]:
    """The repository's .py files outside tests/ and adapters/ (and bench/ unless `bench`)."""
    skipped = SKIPPED if bench else SKIPPED | {"bench"}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not skipped.intersection(parts) and not parts[0].endswith(".egg-info"):
            yield path


def named(tree: ast.AST, names: frozenset[str]) -> set[str]:
    """The names in `names` that `tree` uses as an operation (see the module docstring)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.add(node.name)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and not isinstance(node.func.value, _CONTAINERS)
        ):
            found.add(node.func.attr)
    return found & names


def files_by_operation(files: Iterable[Path]) -> dict[str, list[str]]:
    """Each operation's name → the files (relative to the root) that name it as the operation."""
    names = frozenset(op.name for op in OPERATIONS)
    found: dict[str, list[str]] = {name: [] for name in names}
    for path in files:
        for name in named(ast.parse(path.read_text(), str(path)), names):
            found[name].append(str(path.relative_to(ROOT)))
    return {op.name: found[op.name] for op in OPERATIONS}


def over_limit(*, bench: bool = True) -> dict[str, list[str]]:
    """The operations named in more than LIMIT files, with those files."""
    counted = files_by_operation(source_files(bench=bench))
    return {name: files for name, files in counted.items() if len(files) > LIMIT}


def main() -> None:
    """Prints the table, then the files of each operation over the limit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="leave bench/ out")
    bench = not parser.parse_args().no_bench
    counted = files_by_operation(source_files(bench=bench))
    print(f"{'operation':<24} files  (outside tests/, adapters/{'' if bench else ', bench/'})")
    for name, files in counted.items():
        print(f"{name:<24} {len(files):>5}")
    for name, files in counted.items():
        if len(files) > LIMIT:
            print(f"\n{name} is named in {len(files)} files (limit {LIMIT}):")
            print("\n".join(f"  {f}" for f in files))


if __name__ == "__main__":
    main()
