"""Screenshots of every console page, at 1280 px and at a phone's width, in docs/screenshots/.

    .venv/bin/python scripts/screenshots.py                    # every page
    .venv/bin/python scripts/screenshots.py console-overview   # only pages whose name starts so

Seeds a throw-away SQLite database with a project that has something on every page (prompts,
answers, judgments, runs with metrics, model versions), serves the app on a free port, logs in
as an admin in headless Chromium and photographs each page. The pages are listed by area in
`scripts/shots/<area>.py` (`PAGES`, and an optional `seed(session, ids)` that adds what the
area's pages show); add yours there when you add a page, and look at both pictures before you
commit them.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shots import Shot  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine, make_sessionmaker, unit_of_work  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import (  # noqa: E402
    ComparisonPair,
    DatasetSnapshot,
    Judgment,
    ModelVersion,
    Prompt,
    Response,
    Run,
    RunMetric,
    utcnow,
)
from app.services import projects, users  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ADMIN = ("admin@verdict.local", "screenshot password")
WIDE, NARROW = (1280, 900), (420, 900)


def all_pages() -> tuple[list[Shot], list[Callable[..., None]]]:
    """Every area's pages and seeders, from scripts/shots/*.py, in file-name order."""
    pages: list[Shot] = []
    seeders: list[Callable[..., None]] = []
    for path in sorted((Path(__file__).parent / "shots").glob("[!_]*.py")):
        spec = importlib.util.spec_from_file_location(f"shots_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pages.extend(getattr(module, "PAGES", []))
        if path.stem != "__init__" and hasattr(module, "seed"):
            seeders.append(module.seed)
    return pages, seeders


def seed(url: str, seeders: list[Callable[..., None]]) -> dict[str, int | str]:
    """A project with a history: prompts and answers, judgments, runs, versions; then what
    each area adds (`seed(session, ids)` in scripts/shots/<area>.py)."""
    with unit_of_work(make_sessionmaker(make_engine(url))) as s:
        admin = users.create_user(s, ADMIN[0], ADMIN[1], "admin")
        raters = [
            users.create_user(s, f"rater{i}@verdict.local", "screenshot password", "rater")
            for i in range(1, 4)
        ]
        users.create_user(s, "reviewer@verdict.local", "screenshot password", "reviewer")
        project = projects.create_project(
            s,
            "helpful",
            "Helpful answers",
            actor_id=admin.id,
            guidelines="# Pick the more helpful answer\n\nPrefer answers that are **correct**,"
            " then **clear**, then *short*.",
            settings={"reward_retrain_threshold": 50, "auto_mode": True},
        )
        projects.create_project(s, "safety", "Safety review", actor_id=admin.id)
        s.flush()
        base = ModelVersion(
            project_id=project.id,
            kind="policy",
            version=0,
            name="base (smollm2)",
            base_model="smollm2",
            status="archived",
            promoted_at=utcnow() - timedelta(days=2),
        )
        s.add(base)
        s.flush()
        questions = [
            "How do I reverse a list in Python?",
            "What is a reward model?",
            "Explain KL divergence to a new engineer.",
            "Write a haiku about gradient descent.",
            "What does `git rebase` do?",
            "Name three prime numbers.",
        ]
        pairs = []
        for i, text in enumerate(questions * 4):
            prompt = Prompt(project_id=project.id, text=text, source="upload", external_id=f"q{i}")
            s.add(prompt)
            s.flush()
            a = Response(
                prompt_id=prompt.id,
                text=f"A short answer to: {text}",
                model_version_id=base.id,
                model_name="base",
            )
            b = Response(
                prompt_id=prompt.id,
                text="A longer answer that explains every step.",
                model_version_id=base.id,
                model_name="base",
                truncated=i % 5 == 0,
            )
            s.add_all([a, b])
            s.flush()
            pair = ComparisonPair(
                project_id=project.id,
                prompt_id=prompt.id,
                response_a_id=a.id,
                response_b_id=b.id,
                required_judgments=3,
            )
            s.add(pair)
            pairs.append(pair)
        s.flush()
        for n, pair in enumerate(pairs[:15]):
            for rater in raters[: 1 + n % 3]:
                s.add(
                    Judgment(
                        project_id=project.id,
                        pair_id=pair.id,
                        rater_id=rater.id,
                        choice="ab"[n % 2],
                        strength=1 + n % 2,
                        flags=["unsafe"] if n == 3 else [],
                        time_on_task_ms=9000 + 700 * n,
                        active_ms=8000 + 600 * n,
                    )
                )
                pair.judgment_count += 1
        snapshot = DatasetSnapshot(
            project_id=project.id,
            judgment_ids=[],
            content_hash="9" * 64,
            stats={"judgments": 26, "pairs": 15},
            config={},
        )
        s.add(snapshot)
        s.flush()
        reward_run = Run(
            project_id=project.id,
            kind="reward",
            status="succeeded",
            trigger="auto",
            config={"epochs": 1},
            snapshot_id=snapshot.id,
            progress_done=40,
            progress_total=40,
            started_at=utcnow() - timedelta(hours=3),
            finished_at=utcnow() - timedelta(hours=2, minutes=50),
            log_tail="10:02:11 started\n10:11:40 succeeded",
        )
        ppo_run = Run(
            project_id=project.id,
            kind="ppo",
            status="running",
            trigger="auto",
            config={"total_steps": 20},
            progress_done=7,
            progress_total=20,
            started_at=utcnow() - timedelta(minutes=9),
            heartbeat_at=utcnow(),
            worker="verdict@worker-1",
            log_tail="\n".join(f"10:{20 + i:02d}:00 step {i}" for i in range(1, 8)),
        )
        failed = Run(
            project_id=project.id,
            kind="generate",
            status="failed",
            trigger="upload",
            config={},
            error="ModelLoadError: Model directory '/models/x' does not exist",
            finished_at=utcnow() - timedelta(hours=1),
        )
        s.add_all([reward_run, ppo_run, failed])
        s.flush()
        s.add_all(
            RunMetric(run_id=reward_run.id, step=step, name=name, value=value)
            for step in range(40)
            for name, value in (
                ("loss/train", 0.69 - 0.008 * step),
                ("accuracy/val", 0.5 + 0.006 * step),
            )
        )
        s.add_all(
            RunMetric(run_id=ppo_run.id, step=step, name=name, value=value)
            for step in range(7)
            for name, value in (
                ("objective/kl", 0.4 * step),
                ("objective/scores", 0.1 + 0.05 * step),
                ("policy/response_length", 60 - 3 * step),
            )
        )
        reward = ModelVersion(
            project_id=project.id,
            kind="reward",
            version=1,
            name="reward v1",
            base_model="smollm2",
            artifact_path="/var/artifacts/r1",
            status="active",
            run_id=reward_run.id,
            snapshot_id=snapshot.id,
            metrics={"best_val_accuracy": 0.74, "val_pairs": 12},
            promoted_at=utcnow() - timedelta(hours=2),
        )
        s.add(reward)
        s.flush()
        policy = ModelVersion(
            project_id=project.id,
            kind="policy",
            version=1,
            name="ppo v1",
            base_model="smollm2",
            artifact_path="/var/artifacts/p1",
            status="active",
            parent_id=base.id,
            reward_model_id=reward.id,
            snapshot_id=snapshot.id,
            promoted_at=utcnow() - timedelta(hours=1),
            metrics={"score_gain": 0.21, "kl_to_parent": 2.4, "mean_score": 0.61},
        )
        s.add(policy)
        s.flush()
        ids: dict[str, int | str] = {
            "slug": project.slug,
            "run": ppo_run.id,
            "reward_run": reward_run.id,
            "policy": policy.id,
            "reward": reward.id,
            "prompt": pairs[0].prompt_id,
            "pair": pairs[0].id,
            "rater": raters[0].id,
            "admin": admin.id,
        }
        for area_seed in seeders:
            area_seed(s, ids)
            s.flush()
        return ids


def serve(settings: Settings) -> tuple[uvicorn.Server, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    wanted = sys.argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=f"sqlite:///{tmp}/verdict.db",
            var_dir=Path(tmp),
            secret_key="screenshot-secret-" + "x" * 32,
            broker_url="memory://",
        )
        upgrade_database(settings)
        pages, seeders = all_pages()
        ids = seed(settings.database_url, seeders)
        server, base = serve(settings)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                for width, height in (WIDE, NARROW):
                    context = browser.new_context(
                        base_url=base, viewport={"width": width, "height": height}
                    )
                    page = context.new_page()
                    page.goto("/login")
                    page.fill("#email", ADMIN[0])
                    page.fill("#password", ADMIN[1])
                    page.click("button[type=submit]")
                    page.wait_for_load_state("networkidle")
                    for shot in pages:
                        if wanted and not any(shot.name.startswith(w) for w in wanted):
                            continue
                        path = shot.path(ids) if callable(shot.path) else shot.path
                        page.goto(path)
                        page.wait_for_load_state("networkidle")
                        if shot.before is not None:
                            shot.before(page)
                        suffix = "" if width == WIDE[0] else "-narrow"
                        target = OUT / f"{shot.name}{suffix}.png"
                        page.screenshot(path=str(target), full_page=shot.full_page)
                        print(f"{target.relative_to(ROOT)}  ({path})")
                    context.close()
                browser.close()
        finally:
            server.should_exit = True


if __name__ == "__main__":
    main()
