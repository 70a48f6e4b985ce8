"""The parts of `app/` and `workers/` import each other only along the arrows drawn in
docs/architecture.md. Read from the import graph of the source (every import statement,
including those inside functions and under TYPE_CHECKING), not from a grep of strings."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import ROOT_DIR

# part -> the parts of this project it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "app.kinds": {"app.kinds"},
    "app.core": {"app.core"},
    "app.models": {"app.models", "app.core", "app.kinds"},
    "app.ml": {"app.ml", "app.kinds"},
    "app.services": {"app.services", "app.models", "app.core", "app.kinds"},
    "app.jobs": {"app.jobs", "app.services", "app.ml", "app.models", "app.core", "app.kinds"},
    "app.api": {"app.api", "app.services", "app.models", "app.core", "app.kinds"},
    "app.web": {"app.web", "app.api", "app.services", "app.models", "app.core", "app.kinds"},
    "app.main": {"app.api", "app.web", "app.services", "app.core"},
    "app.cli": {"app.cli", "app.demo", "app.services", "app.models", "app.core", "app.kinds"},
    "app.demo": {"app.demo", "app.services", "app.models", "app.core", "app.kinds"},
    "workers": {"workers", "app.jobs", "app.services", "app.core", "app.kinds"},
}
# Third-party packages a part must never import: the web process and the services stay free
# of torch, the trainers free of the database and the web stack.
FORBIDDEN: dict[str, set[str]] = {
    "app.kinds": {"torch", "transformers", "peft", "sqlalchemy", "fastapi", "celery"},
    "app.ml": {"sqlalchemy", "fastapi", "starlette", "celery", "kombu", "alembic"},
    "app.services": {"torch", "transformers", "peft", "safetensors", "gguf", "fastapi"},
    "app.api": {"torch", "transformers", "peft", "celery"},
    "app.web": {"torch", "transformers", "peft", "celery"},
    "app.models": {"torch", "transformers", "fastapi", "celery"},
    "app.core": {"torch", "transformers", "fastapi", "celery"},
}


def part_of(module: str) -> str:
    """The part a module belongs to: `app.services.runs` -> `app.services`."""
    if module.startswith(("app.cli", "app.demo")):
        return "app.cli" if module.startswith("app.cli") else "app.demo"
    pieces = module.split(".")
    return ".".join(pieces[:2]) if pieces[0] == "app" else pieces[0]


def modules() -> Iterator[tuple[str, Path]]:
    for top in ("app", "workers"):
        for path in sorted((ROOT_DIR / top).rglob("*.py")):
            relative = path.relative_to(ROOT_DIR).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports_of(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """Every module `path` imports, with the line, wherever the statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from app import jobs` imports app.jobs
                yield f"{target}.{alias.name}", node.lineno


GRAPH = [
    (module, path, target, line)
    for module, path in modules()
    for target, line in imports_of(path, module)
]


def test_the_graph_was_read() -> None:
    assert {part_of(m) for m, *_ in GRAPH} >= set(ALLOWED)
    assert len(GRAPH) > 300


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_the_architecture_allows(part: str) -> None:
    project_modules = {m for m, _ in modules()}
    wrong = sorted(
        f"{path.relative_to(ROOT_DIR)}:{line} imports {target}"
        for module, path, target, line in GRAPH
        if part_of(module) == part
        and target in project_modules
        and part_of(target) not in ALLOWED[part]
    )
    assert wrong == []


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_part_imports_a_package_it_must_stay_free_of(part: str) -> None:
    wrong = sorted(
        f"{path.relative_to(ROOT_DIR)}:{line} imports {target}"
        for module, path, target, line in GRAPH
        if part_of(module) == part and target.split(".")[0] in FORBIDDEN[part]
    )
    assert wrong == []


def test_only_workers_import_the_jobs() -> None:
    importers = {
        part_of(module)
        for module, _, target, _ in GRAPH
        if target.startswith("app.jobs") and not module.startswith("app.jobs")
    }
    assert importers == {"workers"}


def test_the_web_process_never_loads_torch() -> None:
    """Building the app (every route module) in a fresh interpreter imports no model code."""
    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "create_app()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'app.ml', 'app.jobs')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
