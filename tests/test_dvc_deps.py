"""Every DVC stage lists the code it runs: the repository modules its entry point imports, transitively.

A module missing from a stage's ``deps`` means ``dvc repro`` keeps stale results after that module changes.
The import closure is read from the source (``ast``: module-level and function-level imports alike), so the
check needs neither Ray nor MLflow to import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "pipelines")
PIPELINES = [REPO / "dvc.yaml", *sorted((REPO / "studies").glob("*/dvc.yaml"))]


def _module_file(name: str) -> Path | None:
    """The repository file of a dotted module name (a package's ``__init__.py``), or None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    """Repository files imported by ``path`` (absolute imports, and ``from pkg import submodule``)."""
    found: set[Path] = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                file = _module_file(".".join(parts[:i]))
                if file is not None:
                    found.add(file)
    return found


def import_closure(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path) - seen)
    return seen


def _stages(dvc_file: Path):
    for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
        body = stage.get("do", stage)  # foreach stages keep cmd and deps under `do`
        match = re.search(r"python -m (pipelines\.\w+)", body["cmd"])
        if match:
            yield name, match.group(1), body


CASES = [(f, name, module, body) for f in PIPELINES for name, module, body in _stages(f)]


def test_every_stage_is_checked():
    assert {module for *_, module, _ in CASES} >= {
        "pipelines.prepare", "pipelines.sweep", "pipelines.evaluate", "pipelines.report"}


@pytest.mark.parametrize(
    ("dvc_file", "stage", "module", "body"), CASES,
    ids=[f"{c[0].relative_to(REPO).parent}:{c[1]}" for c in CASES],
)
def test_stage_deps_cover_imported_code(dvc_file, stage, module, body):
    deps = [REPO / d for d in body["deps"] if "${" not in d]  # studies' dvc.yaml run with wdir ../.. (= REPO)
    closure = import_closure(_module_file(module))
    # an __init__.py that only marks a package carries no code worth re-running a stage for
    needed = {p for p in closure if p.name != "__init__.py" or p.read_text().strip()}
    missing = sorted(str(p.relative_to(REPO)) for p in needed
                     if not any(p == d or d in p.parents for d in deps))
    assert not missing, f"{dvc_file.relative_to(REPO)} stage {stage} runs code it does not list in deps: {missing}"
