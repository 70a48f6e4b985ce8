"""`verdict runs watch` on a pipe: one line per change of progress, with the run's own elapsed
time and an ETA as h:mm:ss. A real `python -m app.cli` process follows a run that the test
drives the way a worker would (`claim_run`, then `RunHooks`), without a worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.cli_runs import clock
from app.core.config import Settings
from app.core.db import make_sessionmaker, unit_of_work
from app.jobs import runner
from app.models import Run, utcnow
from app.services import projects, runs
from tests.conftest import empty_all_tables, engine_for

LINE = re.compile(
    r"^run (\d+) (queued|running|succeeded|failed|cancelled) (\d+)/(\d+|\?)"
    r" elapsed (-|\d+:\d\d:\d\d) eta (-|\d+:\d\d:\d\d)$"
)


@pytest.fixture
def cli_env(sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": sqlite_url,
        "VERDICT_VAR_DIR": str(tmp_path / "var"),
        "COLUMNS": "200",
    }
    for forcing in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(forcing, None)  # the point is a stream that is not a terminal
    yield env
    empty_all_tables(sqlite_url)


def seconds(text: str) -> int:
    h, m, s = (int(part) for part in text.split(":"))
    return h * 3600 + m * 60 + s


def test_clock() -> None:
    assert [clock(None), clock(0), clock(59.6), clock(3725)] == [
        "-",
        "0:00:00",
        "0:01:00",
        "1:02:05",
    ]


def read_line(stream: object, deadline: float) -> str:
    assert time.monotonic() < deadline, "no line from the watcher in time"
    line = stream.readline()  # type: ignore[attr-defined]
    assert line, "the watcher closed its output early"
    return str(line).rstrip("\n")


def test_watch_on_a_pipe_logs_one_line_per_change(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=sqlite_url, var_dir=tmp_path / "var")
    sessions = make_sessionmaker(engine_for(sqlite_url))
    with unit_of_work(sessions) as session:
        project = projects.create_project(session, "watch", "Watch")
        run = runs.create_run(session, project, "generate", settings=settings)
    run_id = run.id

    watcher = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "runs", "watch", str(run_id), "--interval", "0.1"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a process manager captures it: one stream, a pipe
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert LINE.match(first := read_line(watcher.stdout, deadline)), first
        assert first == f"run {run_id} queued 0/? elapsed - eta -"

        with unit_of_work(sessions) as session:
            assert runner.claim_run(session, run_id, worker="w") == 1
        # The run started 100 s before the watcher saw it: elapsed counts from the run's start.
        with unit_of_work(sessions) as session:
            session.execute(
                sa.update(Run)
                .where(Run.id == run_id)
                .values(started_at=utcnow() - timedelta(seconds=100))
            )
        hooks = runner.RunHooks(sqlite_url, run_id, 1, heartbeat_interval_s=60)
        hooks.progress(1, 4, "a quarter")
        lines = [read_line(watcher.stdout, deadline)]
        while not lines[-1].startswith(f"run {run_id} running 1/4"):
            lines.append(read_line(watcher.stdout, deadline))  # the claim's 0/? may come first
        quarter = LINE.match(lines[-1])
        assert quarter is not None, lines
        assert 100 <= seconds(quarter[5]) <= 130
        assert 290 <= seconds(quarter[6]) <= 400  # 100 s for 1 of 4: about 300 s left

        time.sleep(1)  # ten polls with nothing new: no line
        hooks.progress(3, 4, "three quarters")
        three = LINE.match(read_line(watcher.stdout, deadline))
        assert three is not None and (three[2], three[3], three[4]) == ("running", "3", "4")
        assert 25 <= seconds(three[6]) <= 45  # ~101 s for 3 of 4: about 34 s left

        hooks.finish("succeeded", result={"responses": 4})
        out, _ = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, out
    rest = out.splitlines()
    assert LINE.match(rest[0]) and rest[0].startswith(f"run {run_id} succeeded 3/4 elapsed ")
    assert rest[0].endswith(" eta -")
    assert '"responses": 4' in out
    assert "\x1b[" not in out  # no terminal escapes in a log


def test_watch_keeps_its_lines_on_stderr_and_the_result_on_stdout(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=sqlite_url, var_dir=tmp_path / "var")
    sessions = make_sessionmaker(engine_for(sqlite_url))
    with unit_of_work(sessions) as session:
        project = projects.create_project(session, "watch2", "Watch 2")
        run = runs.create_run(session, project, "generate", settings=settings)
    with unit_of_work(sessions) as session:
        runner.claim_run(session, run.id, worker="w")
    hooks = runner.RunHooks(sqlite_url, run.id, 1, heartbeat_interval_s=60)
    hooks.progress(2, 2, "done")
    hooks.finish("failed", error="ModelLoadError: no such model")

    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "runs", "watch", str(run.id)],
        env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""  # stdout is for the result (a failed run has none)
    lines = done.stderr.splitlines()
    assert LINE.match(lines[0]) and lines[0].startswith(f"run {run.id} failed 2/2 elapsed 0:00:0")
    assert "ModelLoadError: no such model" in lines[-1]
