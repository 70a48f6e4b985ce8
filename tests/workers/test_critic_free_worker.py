"""RLOO and GRPO runs on a real worker with tiny random models, started the way the closed loop
starts them: a reward run's follow-up is the project's `loop_algorithm`. Each yields a candidate
with its lineage and metrics, and the candidate's evaluation is queued."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from app.models import ModelVersion, Project, Run, RunMetric
from app.services import loop, runs
from app.services.errors import InvalidInput
from tests.workers.conftest import Stack
from tests.workers.test_policy_worker import FINISHED, evaluate_run_of, project_with_reward_model

pytestmark = pytest.mark.worker

SMALL = {
    "total_steps": 2, "batch_size": 2, "num_generations": 2, "mini_batch_size": 2,
    "max_new_tokens": 6, "learning_rate": 1e-3, "sample_every": 1,
}  # fmt: skip


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_the_loop_algorithm_runs_after_a_reward_run(live: Stack, algorithm: str) -> None:
    project_id, reward_id = project_with_reward_model(live, f"cf-{algorithm}")
    with live.session() as s:
        project = s.get(Project, project_id)
        reward = s.get(ModelVersion, reward_id)
        assert project is not None and reward is not None
        project.settings = {
            **project.settings, "auto_mode": True, "loop_algorithm": algorithm,
            f"loop_{algorithm}_config": SMALL,
        }  # fmt: skip
        # The reward run that "just finished" (its model is the fixture's).
        reward_run = Run(project_id=project_id, kind="reward", status="succeeded", config={})
        s.add(reward_run)
        s.flush()
        messages: list[str] = []
        queued = loop.after_reward_run(
            s, project, reward, reward_run.id, messages.append, settings=live.settings
        )
        s.commit()
        assert queued is not None, messages
        run_id = queued.id
        assert (queued.kind, queued.trigger) == (algorithm, "auto")
        assert queued.config["reward_model_id"] == reward_id
        assert queued.config["estimator"] == algorithm
        assert queued.config["num_generations"] == 2  # the project's loop config
    done = live.wait_status(run_id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.progress_done == done.progress_total == 2
    assert f"{algorithm.upper()} from policy v0" in done.log_tail

    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run_id))
        names = set(s.scalars(select(RunMetric.name).where(RunMetric.run_id == run_id)))
    assert version is not None and version.reward_model_id == reward_id
    assert (version.kind, version.version) == ("policy", 1)
    assert version.metrics["algorithm"] == algorithm and version.metrics["steps"] == 2
    assert {"objective/kl", "objective/scores", "objective/group_score_std"} <= names
    assert set(done.result["samples"]) == {"1", "2"}
    assert version.artifact_path
    assert AutoModelForCausalLM.from_pretrained(version.artifact_path).config.vocab_size > 0
    evaluated = evaluate_run_of(live, run_id)
    assert evaluated.status == "succeeded", (evaluated.error, evaluated.log_tail)


def test_a_run_without_a_reward_model_is_refused(live: Stack) -> None:
    project = live.project(4, slug="cf-none")
    with live.session() as s:
        row = s.get(Project, project.id)
        assert row is not None
        with pytest.raises(InvalidInput, match="reward model"):
            runs.create_run(s, row, "rloo", SMALL, settings=live.settings)


def test_a_bad_knob_is_refused_at_its_field(live: Stack) -> None:
    project_id, _ = project_with_reward_model(live, "cf-bad")
    with live.session() as s:
        row = s.get(Project, project_id)
        assert row is not None
        with pytest.raises(InvalidInput, match="invalid grpo config") as refused:
            runs.create_run(s, row, "grpo", {**SMALL, "mini_batch_size": 3}, settings=live.settings)
    [error] = refused.value.errors
    assert error.field == "config.mini_batch_size"
    assert "must divide batch_size x num_generations (2 x 2 = 4)" in error.message
