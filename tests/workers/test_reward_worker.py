"""Judgments → reward run on a real worker → a reward model version anyone can load, scored
through the API by the worker. Tiny random model; synthetic preference for a marker word."""

import random
import time
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.main import create_app
from app.ml.reward import score_responses
from app.models import (
    ComparisonPair,
    DatasetSnapshot,
    Judgment,
    ModelVersion,
    Prompt,
    Response,
    Run,
)
from app.services import runs, users
from tests.conftest import bearer
from tests.workers.conftest import Stack

pytestmark = pytest.mark.worker

MARKER = "helpful"
WORDS = ["yes", "no", "maybe", "good", "bad", "better", "worse", "honest", "sea", "poem"]


def seed_judgments(live: Stack, n: int, **settings: Any) -> int:
    """A project whose rater always prefers the response containing the marker word."""
    project = live.project(0, slug="rm", overlap=1, **settings)
    rng = random.Random(0)
    with live.session() as s:
        rater = users.create_user(s, "rater@example.com", "long enough pw", "rater")
        for i in range(n):
            prompt = Prompt(
                project_id=project.id, text=f"Question {i % 12}: say something", source="test"
            )
            s.add(prompt)
            s.flush()
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            marked = " ".join(words[:1] + [MARKER] + words[1:])
            plain = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            a, b = (
                Response(prompt_id=prompt.id, text=marked),
                Response(prompt_id=prompt.id, text=plain),
            )
            if i % 2:
                a, b = b, a
            s.add_all([a, b])
            s.flush()
            pair = ComparisonPair(
                project_id=project.id,
                prompt_id=prompt.id,
                response_a_id=a.id,
                response_b_id=b.id,
                required_judgments=1,
                judgment_count=1,
            )
            s.add(pair)
            s.flush()
            s.add(
                Judgment(
                    project_id=project.id,
                    pair_id=pair.id,
                    rater_id=rater.id,
                    choice="a" if MARKER in a.text else "b",
                    strength=2,
                )
            )
        s.commit()
    return project.id


def test_reward_run_trains_registers_and_scores(live: Stack) -> None:
    project_id = seed_judgments(live, 64)
    with live.session() as s:
        from app.models import Project

        project = s.get(Project, project_id)
        assert project is not None
        run = runs.create_run(
            s,
            project,
            "reward",
            {
                "train_mode": "full",
                "epochs": 3,
                "learning_rate": 3e-3,
                "batch_size": 8,
                "val_fraction": 0.25,
                "max_length": 64,
            },
            settings=live.settings,
        )
    done = live.wait_status(run.id, ("succeeded", "failed", "cancelled"), timeout=240)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.snapshot_id is not None and done.progress_done == done.progress_total

    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
        snapshot = s.get(DatasetSnapshot, done.snapshot_id)
    assert version is not None and snapshot is not None
    assert (version.kind, version.status, version.snapshot_id) == ("reward", "active", snapshot.id)
    assert len(snapshot.judgment_ids) == 64
    assert version.metrics["best_val_accuracy"] >= 0.75, version.metrics
    # One judgment per pair here: examples and distinct pairs agree, and together make 64.
    m = version.metrics
    assert (m["train_examples"], m["val_examples"]) == (m["train_pairs"], m["val_pairs"])
    assert m["train_examples"] + m["val_examples"] == 64
    low, high = m["best_val_accuracy_ci95"]
    assert m["best_val_accuracy_pairs"] == m["val_pairs"]
    assert low < m["best_val_accuracy"] <= high
    assert done.result["metrics"]["best_val_accuracy_ci95"] == [low, high]

    # Plain transformers loads it; its score at the last token matches Verdict's scorer.
    assert version.artifact_path
    model = AutoModelForSequenceClassification.from_pretrained(version.artifact_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(version.artifact_path)
    messages = [{"role": "user", "content": "Question 3: say something"}]
    answers = [f"good {MARKER} sea", "bad worse no"]
    ours = score_responses(version.artifact_path, messages, answers)
    for answer, expected in zip(answers, ours, strict=True):
        ids = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            logits = model(**ids).logits
        assert logits.shape[-1] == 1
        assert (
            abs(float(logits[0, -1]) - expected) < 1e-3
            or abs(float(logits[0, 0]) - expected) < 1e-3
        )

    # The scoring API: the web process queues a `score` run, the worker answers.
    app = create_app(live.settings)
    with live.session() as s:
        admin = users.create_user(s, "admin@example.com", "long enough pw", "admin")
        token = users.create_token(s, admin, "t").secret
    with TestClient(app) as client:
        response = client.post(
            f"/api/v1/models/{version.id}/score",
            json={"messages": messages, "responses": answers},
            headers=bearer(token),
        )
        assert response.status_code == 200, response.text
        scores = response.json()["scores"]
        assert scores == pytest.approx(ours, abs=1e-4)
        assert scores[0] > scores[1]
        policy = client.post(
            f"/api/v1/models/{version.id}/generate", json={"prompt": "hi"}, headers=bearer(token)
        )
        assert policy.status_code == 422 and "not a policy model" in policy.json()["detail"]
    app.state.engine.dispose()


def test_beat_starts_a_reward_run_when_enough_judgments_arrive(live: Stack) -> None:
    project_id = seed_judgments(live, 12, reward_retrain_threshold=10)
    live.env["VERDICT_REWARD_TRIGGER_INTERVAL_S"] = "1"
    live.start_beat()

    def auto_run() -> Any:
        with live.session() as s:
            return s.scalar(select(Run).where(Run.project_id == project_id, Run.kind == "reward"))

    from tests.workers.conftest import wait_for

    run = wait_for(auto_run, 60, "the beat to queue a reward run", interval=0.5)
    assert run.trigger == "auto"
    done = live.wait_status(run.id, ("succeeded", "failed", "cancelled"), timeout=240)
    assert done.status == "succeeded", (done.error, done.log_tail)
    time.sleep(3)  # several more beats: the judgments are in the snapshot now, so no new run
    with live.session() as s:
        reward_runs = s.scalars(select(Run).where(Run.kind == "reward")).all()
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
    assert len(reward_runs) == 1
    assert version is not None and version.kind == "reward"
