"""How fast a `verdict` command starts: `verdict --help`, and `verdict runs list --project x`
against a migrated SQLite database in a temporary directory.

    .venv/bin/python bench/cli_startup.py                          # 15 runs each, updates the docs
    .venv/bin/python bench/cli_startup.py --baseline /tmp/before   # also another checkout
    .venv/bin/python bench/cli_startup.py --runs 30 --no-write

Each run is a fresh process doing what the `verdict` console script does (`from app.cli import
main; main()`), timed from spawn to exit. Every command gets one untimed run first (bytecode
caches), and the commands (and checkouts) take turns, so a change in the machine's load hits
them alike. One more run per command counts the modules it imported and names any of the heavy
packages a command that runs no model should not load. `--baseline DIR` times another checkout
of the code the same way (for example the last commit: `git archive HEAD | tar -x -C DIR`),
with this checkout's virtualenv. Writes a "CLI startup" section into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sections import DOCS, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## CLI startup"
HEAVY = ("torch", "transformers", "celery", "kombu", "alembic", "uvicorn", "fastapi")
HEAVY_MODULES = (*HEAVY, "rich.progress")

ENTRY = "import sys; sys.argv[0] = 'verdict'; from app.cli import main; main()"
# The same, reporting at exit how many modules the process had imported, and which heavy ones.
COUNTING_ENTRY = f"""
import atexit, json, os, sys
def _report():
    heavy = [h for h in {HEAVY_MODULES!r} if h in sys.modules]
    with open(os.environ["BENCH_MODULES_OUT"], "w") as f:
        json.dump({{"count": len(sys.modules), "heavy": heavy}}, f)
atexit.register(_report)
{ENTRY}
"""
COMMANDS = {
    "verdict --help": ["--help"],
    "verdict runs list --project x": ["runs", "list", "--project", "x"],
}


@dataclass
class Series:
    command: str
    code: str
    times: list[float] = field(default_factory=list)
    modules: int = 0
    heavy: list[str] = field(default_factory=list)


def run_cli(tree: Path, args: list[str], env: dict[str, str], entry: str = ENTRY) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", entry, *args],
        cwd=tree,  # `-c` puts the current directory first on sys.path: that checkout's `app`
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`verdict {' '.join(args)}` in {tree} failed:\n{result.stderr}")
    return elapsed


def prepare_database(work: Path) -> dict[str, str]:
    """A migrated SQLite database holding project `x`, and the environment pointing at it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERDICT_")}
    env["VERDICT_DATABASE_URL"] = f"sqlite:///{work / 'verdict.db'}"
    env["VERDICT_VAR_DIR"] = str(work / "var")
    run_cli(ROOT, ["db", "upgrade"], env)
    run_cli(ROOT, ["project", "create", "--slug", "x", "--name", "X"], env)
    return env


def measure(trees: dict[str, Path], runs: int, env: dict[str, str]) -> list[Series]:
    series = {(command, code): Series(command, code) for command in COMMANDS for code in trees}
    for args in COMMANDS.values():  # warm-up
        for tree in trees.values():
            run_cli(tree, args, env)
    for _ in range(runs):
        for (command, code), s in series.items():
            s.times.append(run_cli(trees[code], COMMANDS[command], env))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "modules.json"
        for (command, code), s in series.items():
            run_cli(trees[code], COMMANDS[command], {**env, "BENCH_MODULES_OUT": str(out)},
                    entry=COUNTING_ENTRY)  # fmt: skip
            report = json.loads(out.read_text())
            s.modules, s.heavy = report["count"], report["heavy"]
    return list(series.values())


def render(results: list[Series], argv: list[str], runs: int, load: tuple[float, float]) -> str:
    rows = [
        f"| `{s.command}` | {s.code} | {min(s.times):.3f} | {statistics.median(s.times):.3f}"
        f" | {max(s.times):.3f} | {s.modules} | {', '.join(s.heavy) or 'none'} |"
        for s in results
    ]
    command = shlex.join([".venv/bin/python", "bench/cli_startup.py", *argv])
    return "\n".join(
        [
            SECTION,
            "",
            "Wall time from spawning a `verdict` command to its exit, in a fresh process each",
            "time (what the console script runs: `from app.cli import main; main()`). `runs list`",
            "runs against a migrated SQLite database in a temporary directory that holds project",
            "`x` (no runs): the database check, one query and the table. Heavy = any of",
            f"{', '.join(HEAVY_MODULES)} in `sys.modules` at exit.",
            "",
            "    " + command,
            "",
            f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} CPU cores"
            f" ({platform.machine()}), Python {platform.python_version()}; load average"
            f" {load[0]:.1f} before, {load[1]:.1f} after. {runs} timed runs per row, after one"
            " untimed one.",
            "",
            "| command | code | min s | median s | max s | modules imported | heavy modules |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
            "",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command")
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same way")
    parser.add_argument("--baseline-label", default="baseline", help="its name in the table")
    parser.add_argument("--no-write", action="store_true", help="do not update the docs")
    args = parser.parse_args()

    trees = {"this checkout": ROOT}
    if args.baseline:
        trees = {args.baseline_label: args.baseline.resolve(), **trees}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="verdict-cli-bench-") as work:
        env = prepare_database(Path(work))
        results = measure(trees, args.runs, env)
    text = render(results, sys.argv[1:], args.runs, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
