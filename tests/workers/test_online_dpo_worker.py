"""On-policy DPO on a real worker with tiny random models: a `dpo` run whose pairs are the
policy's own answers to training prompts, ranked by the reward model, yields an evaluated
candidate; `mixed` adds the human pairs; a worker killed mid-training leaves a run that resumes
on the very pairs it drew; a run that needs a reward model is refused without one."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from app.models import ModelVersion, Project, Run
from app.services import evaluation, runs
from app.services.errors import InvalidInput
from app.services.projects import project_settings
from tests.workers.conftest import Stack, wait_for
from tests.workers.test_policy_worker import (
    FINISHED,
    create,
    evaluate_run_of,
    project_with_reward_model,
    seed_judgments,
)

pytestmark = pytest.mark.worker

# A tiny random reward model's scores differ by hundredths, so no margin is asked of the pairs.
POLICY_PAIRS = {
    "samples_per_prompt": 3, "max_new_tokens": 6, "min_score_margin": 0.0,
    "epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "max_length": 64,
}  # fmt: skip


def saved_pairs(live: Stack, run_id: int) -> dict[str, object]:
    path = Path(live.settings.artifacts_dir) / "runs" / str(run_id) / "policy_pairs.json"
    body: dict[str, object] = json.loads(path.read_text())
    return body


def prompt_texts(live: Stack, project_id: int) -> tuple[set[str], set[str]]:
    """The (training, held-out) prompts' user texts, split as every run splits them."""
    with live.session() as s:
        project = s.get(Project, project_id)
        assert project is not None
        ps = project_settings(project)
        train, held = evaluation.project_prompt_split(
            s, project, ps.heldout_fraction, ps.heldout_seed
        )
        return tuple(  # type: ignore[return-value]
            {m[-1]["content"] for m in evaluation.load_prompt_messages(s, ids)}
            for ids in (train, held)
        )


def test_a_policy_pairs_dpo_run_yields_an_evaluated_candidate(live: Stack) -> None:
    project_id, reward_id = project_with_reward_model(live, "dpo-policy")
    run = create(live, project_id, "dpo", {"pair_source": "policy", **POLICY_PAIRS})
    # Resolved when the run was created: the ranking reward model and the project's temperature.
    assert run.config["reward_model_id"] == reward_id
    assert run.config["temperature"] == 0.7 and run.config["max_new_tokens"] == 6
    done = live.wait_status(run.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)

    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
        reward = s.get(ModelVersion, reward_id)
    assert version is not None and reward is not None
    assert version.status == "candidate" and version.reward_model_id == reward_id
    assert version.snapshot_id == reward.snapshot_id == done.snapshot_id  # as for PPO
    summary = done.result["pairs"]
    train, held = prompt_texts(live, project_id)
    assert summary["source"] == "policy" and summary["human"] == 0
    assert summary["prompts"] == len(train) and summary["answers"] == 3 * len(train)
    assert summary["policy"] + summary["dropped_low_margin"] + summary["dropped_identical"] == (
        len(train)
    )
    assert summary["policy"] >= 2 and summary["mean_margin"] >= 0.0
    assert version.metrics["pairs"] == summary
    assert version.metrics["policy_pairs"] == version.metrics["train_examples"] == summary["policy"]
    assert version.metrics["human_pairs"] == 0 and version.metrics["algorithm"] == "dpo"

    # The pairs saved for a resume are the ones trained on, from training prompts only.
    body = saved_pairs(live, run.id)
    pairs = body["pairs"]
    assert isinstance(pairs, list) and len(pairs) == summary["policy"]
    asked = {p["prompt"][-1]["content"] for p in pairs}
    assert asked <= train and not asked & held
    assert all(p["margin"] >= 0.0 and p["chosen"] != p["rejected"] for p in pairs)
    assert body["key"]["reward_model_id"] == reward_id  # type: ignore[index]
    assert body["key"]["config"]["sampling_seed"] == run.id  # type: ignore[index]

    evaluated = evaluate_run_of(live, run.id)
    assert evaluated.status == "succeeded", (evaluated.error, evaluated.log_tail)
    with live.session() as s:
        version = s.get(ModelVersion, version.id)
    assert version is not None and "kl_to_parent" in version.metrics


def test_a_mixed_dpo_run_trains_on_human_and_policy_pairs(live: Stack) -> None:
    project_id, reward_id = project_with_reward_model(live, "dpo-mixed")
    seed_judgments(live, project_id, 12)
    run = create(
        live, project_id, "dpo",
        {"pair_source": "mixed", "max_policy_prompts": 3, "sampling_seed": 5, **POLICY_PAIRS},
    )  # fmt: skip
    done = live.wait_status(run.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
    assert version is not None
    summary = done.result["pairs"]
    assert summary["source"] == "mixed" and summary["prompts"] == 3
    assert 0 < summary["human"] < 12  # judgments of held-out prompts are left out
    assert 0 < summary["policy"] <= 3
    assert version.metrics["train_examples"] == summary["human"] + summary["policy"]
    # Its own snapshot (the human pairs) and the reward model that ranked the policy's answers.
    assert version.snapshot_id == done.snapshot_id is not None
    assert version.reward_model_id == reward_id
    evaluate_run_of(live, run.id)  # queued like every dpo run's; waited for before cleanup


PAIRS_RESUMED = re.compile(r"resumed with the (\d+) policy pairs drawn by an earlier attempt")


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_killed_run_resumes_on_the_pairs_it_drew(live: Stack) -> None:
    project_id, _ = project_with_reward_model(live, "dpo-kill")
    # Many short steps, a checkpoint after each: the kill lands mid-training.
    config = {**POLICY_PAIRS, "epochs": 40, "batch_size": 1, "checkpoint_every": 1}
    run = create(live, project_id, "dpo", {"pair_source": "policy", **config})
    run_dir = Path(live.settings.artifacts_dir) / "runs" / str(run.id)

    def training() -> bool:
        row = live.run_row(run.id)
        assert row.status in ("queued", "running"), f"the run ended first:\n{row.log_tail}"
        return (run_dir / "dpo_checkpoint.pt").exists() and row.progress_done >= 2

    wait_for(training, 180, "policy pairs drawn and two DPO steps")
    drawn = (run_dir / "policy_pairs.json").read_text()
    assert live.worker is not None
    live.worker.signal(signal.SIGKILL)
    live.worker.proc.wait(10)
    killed = live.run_row(run.id)
    assert killed.status == "running" and killed.progress_done < (killed.progress_total or 0)

    live.start_beat()  # the reaper requeues the run of the dead worker
    live.start_worker()
    resumed: set[int] = set()

    def finished() -> Run | None:
        row = live.run_row(run.id)
        # The log tail keeps the last lines only: read it while the rerun goes.
        resumed.update(int(n) for n in PAIRS_RESUMED.findall(row.log_tail))
        return row if row.status in FINISHED else None

    done: Run = wait_for(finished, 240, "the rerun to finish", interval=0.05)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert done.attempts == 2
    summary = done.result["pairs"]
    assert resumed == {summary["policy"]}  # no new sampling: the saved pairs were read back
    assert (run_dir / "policy_pairs.json").read_text() == drawn
    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run.id))
    assert version is not None and version.status == "candidate"
    evaluate_run_of(live, run.id)


def test_policy_pairs_without_a_reward_model_or_sampling_are_refused(live: Stack) -> None:
    bare = live.project(4, slug="dpo-no-rm")
    greedy_id, _ = project_with_reward_model(live, "dpo-greedy")
    with live.session() as s:
        row = s.get(Project, bare.id)
        assert row is not None
        for source in ("policy", "mixed"):
            with pytest.raises(InvalidInput, match=f"pair_source '{source}' ranks") as refused:
                runs.create_run(s, row, "dpo", {"pair_source": source}, settings=live.settings)
            assert "no active reward model" in refused.value.message
            assert [e.field for e in refused.value.errors] == ["config.reward_model_id"]
        # Human pairs need no reward model: the same project takes that run.
        runs.validated_config(s, row, runs.get_kind("dpo"), {"pair_source": "human"})

        # A greedy project (temperature 0) would give K equal answers: refused at the field.
        greedy = s.get(Project, greedy_id)
        assert greedy is not None
        greedy.settings = {**greedy.settings, "temperature": 0.0}
        s.flush()
        with pytest.raises(InvalidInput, match="temperature is 0") as refused:
            runs.create_run(s, greedy, "dpo", {"pair_source": "policy"}, settings=live.settings)
        assert [e.field for e in refused.value.errors] == ["config.temperature"]
        # Its own temperature is taken as given.
        config = runs.validated_config(
            s, greedy, runs.get_kind("dpo"), {"pair_source": "policy", "temperature": 1.0}
        )
        assert config["temperature"] == 1.0
        assert s.scalars(select(Run.id)).all() == []
