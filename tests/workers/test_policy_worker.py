"""PPO and DPO runs on a real worker with tiny random models: a candidate policy version with its
lineage, loadable by plain transformers, then its evaluation run on held-out prompts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.models import (
    ComparisonPair,
    DatasetSnapshot,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Response,
    Run,
    RunMetric,
)
from app.services import runs, users
from tests.workers.conftest import Stack

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")
SMALL_EVAL = {"max_prompts": 4, "max_new_tokens": 6, "batch_size": 4}


def save_tiny_reward_model(model_dir: Path, out: Path) -> Path:
    """A randomly initialised 1-output sequence classifier on the tiny policy's backbone."""
    if not (out / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def project_with_reward_model(live: Stack, slug: str, n_prompts: int = 10) -> tuple[int, int]:
    """A project with prompts and an active reward model (with a snapshot, as a trained one
    would have). Returns (project id, reward version id)."""
    project = live.project(
        n_prompts, slug=slug, overlap=1, heldout_fraction=0.3, loop_evaluate_config=SMALL_EVAL
    )
    rm_dir = save_tiny_reward_model(live.model_dir, live.var_dir / "tiny-reward")
    with live.session() as s:
        snapshot = DatasetSnapshot(project_id=project.id, judgment_ids=[], content_hash="0" * 64)
        s.add(snapshot)
        s.flush()
        reward = ModelVersion(
            project_id=project.id, kind="reward", version=0, name="reward v0",
            base_model=str(live.model_dir), artifact_path=str(rm_dir), status="active",
            snapshot_id=snapshot.id, metrics={"best_val_accuracy": 0.8},
        )  # fmt: skip
        s.add(reward)
        s.commit()
        return project.id, reward.id


def create(live: Stack, project_id: int, kind: str, config: dict[str, object]) -> Run:
    with live.session() as s:
        project = s.get(Project, project_id)
        assert project is not None
        return runs.create_run(s, project, kind, config, settings=live.settings)


def evaluate_run_of(live: Stack, run_id: int) -> Run:
    with live.session() as s:
        child = s.scalar(select(Run).where(Run.parent_run_id == run_id))
    assert child is not None, "the policy run queued no evaluation"
    assert (child.kind, child.trigger) == ("evaluate", "auto")
    return live.wait_status(child.id, FINISHED, timeout=120)


def test_ppo_run_yields_an_evaluated_candidate(live: Stack) -> None:
    project_id, reward_id = project_with_reward_model(live, "ppo")
    run = create(
        live, project_id, "ppo",
        {"total_steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
         "max_new_tokens": 6, "learning_rate": 1e-3, "sample_every": 1},
    )  # fmt: skip
    assert run.config["reward_model_id"] == reward_id  # resolved when the run was created
    done = live.wait_status(run.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.progress_done == done.progress_total == 2

    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
        base = s.scalar(
            select(ModelVersion).where(
                ModelVersion.project_id == project_id,
                ModelVersion.kind == "policy",
                ModelVersion.version == 0,
            )
        )
        reward = s.get(ModelVersion, reward_id)
        metric_names = set(s.scalars(select(RunMetric.name).where(RunMetric.run_id == run.id)))
        prompt_ids = list(s.scalars(select(Prompt.id).where(Prompt.project_id == project_id)))
    assert version is not None and base is not None and reward is not None
    assert (version.kind, version.version, version.parent_id) == ("policy", 1, base.id)
    assert version.reward_model_id == reward_id and version.snapshot_id == reward.snapshot_id
    assert done.snapshot_id == reward.snapshot_id
    assert version.metrics["algorithm"] == "ppo" and version.metrics["steps"] == 2
    assert {"objective/kl", "objective/scores", "loss/policy", "policy/entropy"} <= metric_names
    assert version.metrics["heldout"]["count"] >= 1
    assert version.metrics["train_prompts"] == len(prompt_ids) - version.metrics["heldout"]["count"]
    # The samples table is stored on the run.
    assert set(done.result["samples"]) == {"1", "2"}
    row = done.result["samples"]["1"][0]
    assert {"prompt", "response", "score"} <= set(row)
    assert done.result["model_version_id"] == version.id

    # Hugging Face format: plain transformers loads the candidate.
    assert version.artifact_path
    model = AutoModelForCausalLM.from_pretrained(version.artifact_path)
    assert model.config.vocab_size > 0

    evaluated = evaluate_run_of(live, run.id)
    assert evaluated.status == "succeeded", (evaluated.error, evaluated.log_tail)
    with live.session() as s:
        version = s.get(ModelVersion, version.id)
    assert version is not None
    assert version.status == "candidate"  # auto mode is off: nobody promotes it
    evaluation = version.metrics["evaluation"]
    assert evaluation["num_prompts"] == len(evaluation["heldout_prompt_ids"]) >= 1
    assert set(evaluation["heldout_prompt_ids"]) <= set(prompt_ids)
    assert version.metrics["kl_to_parent"] == evaluation["kl_to_parent"]
    assert version.metrics["score_gain"] == pytest.approx(
        evaluation["mean_score"] - evaluation["parent_mean_score"]
    )
    assert evaluation["samples"] and "parent_response" in evaluation["samples"][0]
    assert "passed" in version.metrics["promotion_rule"]
    assert evaluated.result["promoted"] is False


def seed_judgments(live: Stack, project_id: int, n: int) -> None:
    """A rater who prefers the response with the word 'helpful', on the project's prompts."""
    rng = random.Random(0)
    words = ["yes", "no", "maybe", "good", "bad", "sea", "poem"]
    with live.session() as s:
        rater = users.create_user(s, "dpo-rater@example.com", "long enough pw", "rater")
        prompt_ids = list(s.scalars(select(Prompt.id).where(Prompt.project_id == project_id)))
        for i in range(n):
            prompt_id = prompt_ids[i % len(prompt_ids)]
            marked = Response(prompt_id=prompt_id, text=f"{rng.choice(words)} helpful {i}")
            plain = Response(prompt_id=prompt_id, text=f"{rng.choice(words)} {rng.choice(words)}")
            s.add_all([marked, plain])
            s.flush()
            pair = ComparisonPair(
                project_id=project_id, prompt_id=prompt_id, response_a_id=marked.id,
                response_b_id=plain.id, required_judgments=1, judgment_count=1,
            )  # fmt: skip
            s.add(pair)
            s.flush()
            s.add(
                Judgment(project_id=project_id, pair_id=pair.id, rater_id=rater.id, choice="a",
                         strength=1)
            )  # fmt: skip
        s.commit()


def test_dpo_run_trains_from_a_snapshot_and_is_evaluated(live: Stack) -> None:
    project_id, _ = project_with_reward_model(live, "dpo")
    seed_judgments(live, project_id, 16)
    run = create(
        live, project_id, "dpo",
        {"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "max_length": 64},
    )  # fmt: skip
    done = live.wait_status(run.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
        assert done.snapshot_id is not None
        snapshot = s.get(DatasetSnapshot, done.snapshot_id)
        margins = list(
            s.scalars(
                select(RunMetric.value)
                .where(RunMetric.run_id == run.id, RunMetric.name == "rewards/margins")
                .order_by(RunMetric.step)
            )
        )
    assert version is not None and snapshot is not None
    assert (version.status, version.snapshot_id, version.parent_id is not None) == (
        "candidate", snapshot.id, True,
    )  # fmt: skip
    assert len(snapshot.judgment_ids) == 16
    # Judgments on held-out prompts are left out of training.
    assert 0 < version.metrics["train_pairs"] < 16
    assert version.metrics["algorithm"] == "dpo"
    assert margins[-1] > margins[0]  # the chosen side pulls ahead of the rejected one

    evaluated = evaluate_run_of(live, run.id)
    assert evaluated.status == "succeeded", (evaluated.error, evaluated.log_tail)
    with live.session() as s:
        version = s.get(ModelVersion, version.id)
    assert version is not None and "kl_to_parent" in version.metrics


def test_dpo_trains_on_a_reliability_weighted_snapshot(live: Stack) -> None:
    # One rater per pair: the reliability model has no overlap to learn from, so every label is
    # its prior's 0.75. DPO trains on them with each pair's own smoothing instead of refusing
    # them as ties (it once kept only labels equal to 1).
    project_id, _ = project_with_reward_model(live, "dpo-soft")
    seed_judgments(live, project_id, 12)
    run = create(
        live, project_id, "dpo",
        {"epochs": 1, "batch_size": 4, "max_length": 64, "data": {"aggregate": "reliability"}},
    )  # fmt: skip
    done = live.wait_status(run.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
        snapshot = s.get(DatasetSnapshot, done.snapshot_id)
    assert version is not None and snapshot is not None
    assert snapshot.config["aggregate"] == "reliability"
    assert (snapshot.stats["aggregate"], snapshot.stats["examples"]) == ("reliability", 12)
    assert 0 < version.metrics["train_examples"] < 12
