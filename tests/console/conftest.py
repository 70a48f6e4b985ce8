"""Console tests: a logged-in browser session per role (TestClient with the session cookie and
its CSRF token), a seeded project with one of everything a page can show, and a counter of SQL
statements for the no-N+1 checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.models import (
    ComparisonPair,
    DatasetSnapshot,
    Invite,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Response,
    Run,
    RunMetric,
    User,
)
from app.services import users
from tests.conftest import TEST_PASSWORD, Factory

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


class Browser:
    """A TestClient logged in through the login form, carrying the page's CSRF token."""

    def __init__(self, client: TestClient, user: User | None) -> None:
        self.client = client
        self.user = user
        self.csrf = ""
        if user is not None:
            login = client.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
            assert token is not None
            done = client.post(
                "/login",
                data={"email": user.email, "password": TEST_PASSWORD, "csrf_token": token[1]},
                follow_redirects=False,
            )
            assert done.status_code == 303, done.text
            # Login starts a new session with a new CSRF token: read it from a page.
            meta = CSRF_META.search(client.get("/").text)
            assert meta is not None
            self.csrf = meta[1]

    def get(self, path: str, **kwargs: object) -> object:
        return self.client.get(path, headers={"accept": "text/html"}, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, data: dict[str, object] | None = None, **kwargs: object) -> object:
        form = {"csrf_token": self.csrf, **(data or {})}
        return self.client.post(
            path,
            data=form,
            headers={"accept": "text/html"},
            follow_redirects=False,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def browser_for(app: FastAPI) -> Iterator[Callable[[User | None], Browser]]:
    clients: list[TestClient] = []

    def make(user: User | None) -> Browser:
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return Browser(client, user)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@dataclass
class Seeded:
    """A project with one of everything: prompts, a pair, judgments, a snapshot, versions and
    runs with metrics. Ids for the path parameters of console routes."""

    project: Project
    admin: User
    reviewer: User
    rater: User
    prompt: Prompt
    pair: ComparisonPair
    run: Run
    policy: ModelVersion
    reward: ModelVersion
    invite: Invite  # pending, for {invite_id}


@pytest.fixture
def seeded(factory: Factory) -> Seeded:
    return seed(factory)


def seed(factory: Factory, hostile: str | None = None) -> Seeded:
    """One of everything a console page shows; with `hostile`, that text (an XSS corpus) in
    every untrusted place: prompt, answers, rationale, run log, run and evaluation samples."""
    admin, reviewer, rater = factory.user("admin"), factory.user("reviewer"), factory.user()
    project = factory.project("console", base_policy="/models/base")
    pair = factory.pair(
        project,
        (hostile or "an answer", (hostile or "") + "another answer"),
        prompt=hostile or "A console question?",
    )
    s = factory.session
    prompt = s.get(Prompt, pair.prompt_id)
    assert prompt is not None
    s.add(
        Judgment(
            project_id=project.id, pair_id=pair.id, rater_id=rater.id, choice="a", strength=2,
            flags=["unsafe"], rationale=hostile or "clearer",
        )
    )  # fmt: skip
    pair.judgment_count += 1
    snapshot = DatasetSnapshot(
        project_id=project.id, judgment_ids=[], content_hash="0" * 64, stats={}, config={}
    )
    s.add(snapshot)
    s.flush()
    reward_run = Run(
        project_id=project.id, kind="reward", status="succeeded", trigger="api", config={},
        snapshot_id=snapshot.id, progress_done=4, progress_total=4,
    )  # fmt: skip
    s.add(reward_run)
    s.flush()
    s.add_all(
        RunMetric(run_id=reward_run.id, step=step, name=name, value=value)
        for step in range(4)
        for name, value in (("loss/train", 0.7 - 0.1 * step), ("accuracy/val", 0.5 + 0.1 * step))
    )
    base = ModelVersion(project_id=project.id, kind="policy", version=0, name="base",
                        base_model="/models/base", status="active")  # fmt: skip
    reward = ModelVersion(project_id=project.id, kind="reward", version=0, name="reward v0",
                          base_model="/models/base", artifact_path="/artifacts/r0",
                          status="active", run_id=reward_run.id, snapshot_id=snapshot.id,
                          metrics={"best_val_accuracy": 0.75})  # fmt: skip
    s.add_all([base, reward])
    s.flush()
    policy = ModelVersion(project_id=project.id, kind="policy", version=1, name="ppo v1",
                          base_model="/models/base", artifact_path="/artifacts/p1",
                          status="candidate", parent_id=base.id, reward_model_id=reward.id,
                          metrics={"score_gain": 0.3, "kl_to_parent": 1.2})  # fmt: skip
    s.add(policy)
    if hostile is not None:
        sample = {"prompt": hostile, "response": hostile, "parent_response": hostile,
                  "reward": 0.5, "score": 0.5, "parent_score": 0.1}  # fmt: skip
        reward_run.log_tail = hostile
        reward_run.result = {"samples": {"1": [sample]}}
        policy.metrics = {**(policy.metrics or {}), "evaluation": {"samples": [sample]}}
    s.commit()
    invite = users.create_invite(s, role="rater", note="seeded", actor=admin).invite
    s.commit()
    return Seeded(project, admin, reviewer, rater, prompt, pair, reward_run, policy, reward, invite)


@contextmanager
def counted_statements(engine: sa.Engine) -> Iterator[list[str]]:
    """The SQL statements `engine` runs inside the block (for the no-N+1 checks)."""
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")):
            statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


__all__ = ["Browser", "Response", "Seeded", "counted_statements"]
