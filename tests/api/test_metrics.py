"""`/metrics`: the Prometheus text format, request latency by route template, the figures read
from the database at scrape time, the optional token, and sums over several web processes.

The last test starts `verdict serve --workers 2` (multiprocess mode, JSON logs) as a deployment
does, and checks that every scrape counts every request, whichever worker answers it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from app.core.config import ROOT_DIR, Settings
from app.main import create_app
from app.models import Judgment, Project, Run, utcnow
from app.services import presence
from tests.conftest import Factory, bearer

PORT = 18210


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def test_latency_is_by_route_template_method_and_status_class(
    client: TestClient, factory: Factory
) -> None:
    project = factory.project("metrics-latency")
    admin = bearer(factory.token(factory.user("admin")))
    for _ in range(3):
        assert client.get(f"/api/v1/projects/{project.slug}/prompts", headers=admin).is_success
    assert client.get("/api/v1/projects/no-such-project/prompts", headers=admin).status_code == 404
    assert client.get("/no/such/page").status_code == 404

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    text = response.text
    route = "/api/v1/projects/{slug}/prompts"
    name = "verdict_http_request_duration_seconds_count"
    # The histogram is the process's own: it counts what this test process's apps served.
    ok = value(text, name, route=route, method="GET", status="2xx")
    assert ok is not None and ok >= 3
    assert (value(text, name, route=route, method="GET", status="4xx") or 0) >= 1
    assert (value(text, name, route="unmatched", method="GET", status="4xx") or 0) >= 1
    assert "metrics-latency" not in text.split("verdict_rater_queue_depth")[0]  # no raw paths
    assert "no/such/page" not in text


def test_request_ids_are_kept_if_sane_or_made(client: TestClient) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-ID": "lb-1234.abc"}).headers["x-request-id"]
        == "lb-1234.abc"
    )
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    for bad in ("has space", "x" * 200, "new\\nline", "<script>"):
        got = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert got != bad and len(got) == 32


def _judgment(project: Project, pair_id: int, rater_id: int, ago_s: float) -> Judgment:
    return Judgment(
        project_id=project.id, pair_id=pair_id, rater_id=rater_id, choice="a", strength=1,
        source="rater", created_at=utcnow() - timedelta(seconds=ago_s),
    )  # fmt: skip


def test_database_figures(client: TestClient, factory: Factory, session: Session) -> None:
    busy = factory.project("busy", overlap=2)
    idle = factory.project("idle")
    open_pairs = [factory.pair(busy) for _ in range(3)]
    factory.pair(busy, judgment_count=2)  # full
    factory.pair(busy, gold_choice="a")  # gold pairs are not the raters' queue
    factory.pair(busy, rating_removed_at=utcnow())  # taken off by moderation
    raters = [factory.user("rater") for _ in range(3)]
    session.add_all(
        [
            _judgment(busy, open_pairs[0].id, raters[0].id, ago_s=5),
            _judgment(busy, open_pairs[0].id, raters[1].id, ago_s=30),
            _judgment(busy, open_pairs[1].id, raters[2].id, ago_s=600),  # not in the last minute
        ]
    )
    session.add_all(
        [
            Run(project_id=busy.id, kind="reward", status="running", progress_done=17),
            Run(project_id=busy.id, kind="generate", status="succeeded", progress_done=4),
            Run(project_id=idle.id, kind="generate", status="succeeded"),
            Run(project_id=idle.id, kind="ppo", status="queued"),
        ]
    )
    now = utcnow()
    presence.record_seen(
        session, "gpu@h1", ["gpu", "default"], started_at=now, now=now - timedelta(seconds=42)
    )
    session.commit()
    running = session.query(Run).filter_by(status="running").one()

    text = client.get("/metrics").text
    assert value(text, "verdict_rater_queue_depth", project="busy") == 3
    assert value(text, "verdict_rater_queue_depth", project="idle") == 0
    assert value(text, "verdict_judgments_last_minute", project="busy") == 2
    assert value(text, "verdict_judgments_last_minute", project="idle") == 0
    assert value(text, "verdict_runs", kind="generate", status="succeeded") == 2
    assert value(text, "verdict_runs", kind="reward", status="running") == 1
    assert value(text, "verdict_runs", kind="ppo", status="queued") == 1
    for queue in ("gpu", "default"):
        age = value(text, "verdict_worker_heartbeat_age_seconds", worker="gpu@h1", queue=queue)
        assert age is not None and 42 <= age < 60
    steps = value(text, "verdict_run_steps_total", kind="reward", run=str(running.id))
    assert steps == 17
    assert len([k for k in samples(text) if k[0] == "verdict_run_steps_total"]) == 1


def test_a_metrics_token_is_required_when_set(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": "scrape-secret"}))
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("wrong")).status_code == 401
        assert client.get("/metrics", headers=bearer("scrape-secret")).status_code == 200
    app.state.engine.dispose()


# --- several web processes --------------------------------------------------------------------


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """`verdict serve --workers 2` on SQLite, with JSON logs; (base URL, metrics dir, log)."""
    assert _free(PORT), f"port {PORT} is taken"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "histogram_999999.db").write_bytes(b"left by an earlier start")
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": sqlite_url,
        "VERDICT_VAR_DIR": str(tmp_path / "var"),
        "VERDICT_SECRET_KEY": "s" * 40,
        "VERDICT_METRICS_DIR": str(metrics_dir),
        "VERDICT_LOG_FORMAT": "json",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(PORT), "--workers", "2"],
            cwd=ROOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{PORT}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
            yield base, metrics_dir, log
        finally:
            proc.terminate()
            proc.wait(20)


def test_several_web_processes_count_every_request(served: tuple[str, Path, Path]) -> None:
    base, metrics_dir, log = served
    assert not (metrics_dir / "histogram_999999.db").exists()  # emptied at start
    sent = 0
    # New connections until both workers have answered some (each then has its own file).
    while len(list(metrics_dir.glob("histogram_*.db"))) < 2 and sent < 400:
        assert httpx.get(f"{base}/healthz").status_code == 200
        sent += 1
    assert len(list(metrics_dir.glob("histogram_*.db"))) == 2, "one worker answered everything"
    # The start-up probes count too: read the first scrape's figure, then add known requests.
    first = value(
        httpx.get(f"{base}/metrics").text,
        "verdict_http_request_duration_seconds_count",
        route="/healthz", method="GET", status="2xx",
    )  # fmt: skip
    assert first is not None and first >= sent
    for _ in range(20):
        assert httpx.get(f"{base}/healthz").status_code == 200
    for _ in range(6):  # whichever worker answers the scrape, it sums both
        got = value(
            httpx.get(f"{base}/metrics").text,
            "verdict_http_request_duration_seconds_count",
            route="/healthz", method="GET", status="2xx",
        )  # fmt: skip
        assert got == first + 20

    # JSON logs: uvicorn's access lines carry the request id the client sent.
    httpx.get(f"{base}/healthz", headers={"X-Request-ID": "trace-42"})
    time.sleep(0.5)
    # Every line, the parent process's included, is one JSON object.
    entries = [json.loads(row) for row in log.read_text().splitlines() if row.strip()]
    assert any(e["message"].startswith("Uvicorn running on") for e in entries)
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert any(e["request_id"] == "trace-42" and "/healthz" in e["message"] for e in access)
    assert all({"time", "level", "logger", "message", "request_id"} <= set(e) for e in entries)
