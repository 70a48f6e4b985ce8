"""What a `verdict` command imports on its way to running: structure, not speed (the timings are
in bench/cli_startup.py). A command that does not run a model must not pay for torch, Celery,
Alembic or the web stack; only the commands that need one of them import it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "celery", "kombu", "alembic", "uvicorn", "fastapi")
# Also kept off every path that does not draw a progress bar.
HEAVY_MODULES = (*HEAVY, "rich.progress")
# What the `verdict` console script runs (see [project.scripts] in pyproject.toml).
ENTRY_POINT = "import sys; sys.argv[0] = 'verdict'; from app.cli import main; main()"


def imported_modules(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    """Every module a fresh `python -X importtime ARGV` imported, read from its import log."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "app.cli" in modules, result.stderr[-2000:]
    return modules


def heavy(modules: set[str]) -> list[str]:
    """The entries of HEAVY_MODULES that were imported (themselves or any submodule)."""
    return [h for h in HEAVY_MODULES if any(m == h or m.startswith(h + ".") for m in modules)]


def test_importing_the_cli_loads_no_heavy_package() -> None:
    assert heavy(imported_modules("-c", "import app.cli")) == []


@pytest.mark.parametrize(
    "args",
    [("--help",), ("runs", "--help"), ("runs", "list", "--help"), ("db", "--help")],
    ids=" ".join,
)
def test_help_loads_no_heavy_package(args: tuple[str, ...]) -> None:
    assert heavy(imported_modules("-c", ENTRY_POINT, *args)) == []


def test_an_ordinary_command_loads_no_heavy_package(db_url: str) -> None:
    env = {**os.environ, "VERDICT_DATABASE_URL": db_url}
    modules = imported_modules("-c", ENTRY_POINT, "runs", "list", "--project", "none", env=env)
    assert "app.services.runs" in modules  # it did reach the database
    assert heavy(modules) == []
