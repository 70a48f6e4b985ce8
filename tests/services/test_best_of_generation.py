"""Best-of-K generation runs executed in-process (the handler a worker calls), on SQLite and
PostgreSQL, with a tiny policy and a tiny reward model. What the run kept is checked against
the K answers and scores recomputed here, independently of the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.jobs import runner
from app.jobs.generate import call_seed
from app.kinds.generate import SamplingConfig
from app.ml.generation import GeneratedResponse, generate_responses
from app.ml.loading import load_causal_lm
from app.ml.reward import LoadedRewardModel, load_reward_model
from app.models import ComparisonPair, ModelVersion, Project, Prompt, Response, Run
from app.services import projects, prompts, registry, runs
from app.services.errors import InvalidInput
from app.services.prompts import prompt_messages
from tests.conftest import Factory
from tests.ml.test_best_of_scoring import plain_score, save_tiny_reward_model
from tests.tiny_models import save_tiny_model

K = 4
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def reward(rm_dir: Path) -> LoadedRewardModel:
    return load_reward_model(rm_dir)


def add_prompts(session: Session, project: Project, n: int, start: int = 1) -> list[int]:
    records = [
        prompts.PromptRecord(line=i, text=f"Question {i}: what is {i} + {i}?")
        for i in range(start, start + n)
    ]
    ids = prompts.store_prompts(session, project, records, source="test").prompt_ids
    session.commit()
    return ids


def add_reward_model(session: Session, project: Project, rm_dir: Path) -> ModelVersion:
    version = registry.create_version(
        session, project, "reward", base_model=str(rm_dir), artifact_path=str(rm_dir)
    )
    registry.activate(session, version)
    session.commit()
    return version


def execute(session: Session, settings: Settings, project: Project, config: dict) -> Run:
    run = runs.create_run(session, project, "generate", config, settings=settings)
    session.commit()
    assert run.task_id is not None
    status = runner.execute_run(run.id, task_id=run.task_id, worker="in-test", settings=settings)
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None
    assert status == "succeeded", row.error or row.log_tail
    return row


def rows_of(session: Session, model: type, prompt_id: int) -> list:
    return list(
        session.scalars(sa.select(model).where(model.prompt_id == prompt_id).order_by(model.id))
    )


def candidates_of(
    tiny_dir: Path, session: Session, run: Run, prompt_id: int
) -> list[GeneratedResponse]:
    """The K answers the run sampled for a prompt, sampled again: each decode call of the run
    holds one prompt here (batch_size = K), seeded by `call_seed(run seed, prompt id)`."""
    prompt = session.get(Prompt, prompt_id)
    assert prompt is not None
    config = SamplingConfig(
        num_responses=K, temperature=0.7, top_p=0.9, max_new_tokens=MAX_NEW_TOKENS,
        batch_size=K, seed=call_seed(run.id, prompt_id),
    )  # fmt: skip
    loaded = load_causal_lm(str(tiny_dir), tiny_dir.parent, allow_hub=False)
    [answers] = generate_responses(loaded, [prompt_messages(prompt)], config)
    return answers


@pytest.mark.parametrize("rule", ["top_bottom", "top_two"])
def test_best_of_k_stores_one_pair_of_the_reward_models_top_and_its_contrast(
    session: Session,
    settings: Settings,
    factory: Factory,
    tiny_dir: Path,
    rm_dir: Path,
    reward: LoadedRewardModel,
    rule: str,
) -> None:
    project = factory.project(
        base_policy=str(tiny_dir), max_new_tokens=MAX_NEW_TOKENS, best_of_k=K, overlap=2
    )
    ids = add_prompts(session, project, 3)
    rm = add_reward_model(session, project, rm_dir)
    run = execute(session, settings, project, {"batch_size": K, "pair_selection": rule})

    gaps = []
    for prompt_id in ids:
        responses = rows_of(session, Response, prompt_id)
        [pair] = rows_of(session, ComparisonPair, prompt_id)
        assert len(responses) == 2 and pair.kind == "standard" and pair.required_judgments == 2
        by_id = {r.id: r for r in responses}
        top, contrast = by_id[pair.response_a_id], by_id[pair.response_b_id]
        assert top.generation_params["best_of"]["role"] == "top"
        assert contrast.generation_params["best_of"]["role"] == "contrast"

        candidates = candidates_of(tiny_dir, session, run, prompt_id)
        prompt = session.get(Prompt, prompt_id)
        assert prompt is not None
        scores = [plain_score(reward, prompt_messages(prompt), c.text) for c in candidates]
        assert len(set(c.text for c in candidates)) > 1, "the K samples should differ"
        for row in (top, contrast):
            note = row.generation_params["best_of"]
            assert (note["k"], note["rule"], note["reward_model_id"]) == (K, rule, rm.id)
            assert row.text == candidates[note["candidate"]].text
            assert note["scores"] == pytest.approx(scores, abs=1e-4)
            assert note["score"] == pytest.approx(scores[note["candidate"]], abs=1e-4)
        ordered = sorted(scores, reverse=True)
        assert top.generation_params["best_of"]["score"] == pytest.approx(ordered[0], abs=1e-4)
        expected_contrast = ordered[-1] if rule == "top_bottom" else ordered[1]
        got_contrast = contrast.generation_params["best_of"]["score"]
        assert got_contrast == pytest.approx(expected_contrast, abs=1e-4)
        gaps.append(ordered[0] - expected_contrast)

    result = run.result
    assert result["responses"] == 6 and result["pairs"] == 3
    assert (result["best_of_k"], result["pair_selection"]) == (K, rule)
    assert result["reward_model_id"] == rm.id
    assert result["mean_score_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    assert f"best-of-K: K={K}" in run.log_tail and f"pair_selection={rule}" in run.log_tail


def test_a_rerun_answers_no_prompt_twice_and_completes_a_half_answered_one(
    session: Session, settings: Settings, factory: Factory, tiny_dir: Path, rm_dir: Path
) -> None:
    project = factory.project(base_policy=str(tiny_dir), max_new_tokens=MAX_NEW_TOKENS, best_of_k=K)
    [first] = add_prompts(session, project, 1)
    add_reward_model(session, project, rm_dir)
    execute(session, settings, project, {"batch_size": K})
    again = execute(session, settings, project, {})
    assert again.result["responses"] == 0
    assert "every prompt has 2 responses" in again.log_tail
    assert len(rows_of(session, Response, first)) == 2

    # A prompt with one answer of the policy already (a run that kept more than one, say) gets
    # only the reward model's top answer, paired with the one it had.
    [second] = add_prompts(session, project, 1, start=2)
    policy = registry.active_policy(session, project, settings)
    old = Response(prompt_id=second, text="an older answer", model_version_id=policy.id)
    session.add(old)
    session.commit()
    run = execute(session, settings, project, {"batch_size": K})
    assert run.result["responses"] == 1 and run.result["pairs"] == 1
    assert run.result["mean_score_gap"] is None  # no top-vs-contrast pair this time
    new = [r for r in rows_of(session, Response, second) if r.id != old.id]
    assert [r.generation_params["best_of"]["role"] for r in new] == ["top"]
    [pair] = rows_of(session, ComparisonPair, second)
    assert (pair.response_a_id, pair.response_b_id) == (old.id, new[0].id)


def test_without_a_reward_model_best_of_k_is_off_and_the_log_says_so(
    session: Session, settings: Settings, factory: Factory, tiny_dir: Path
) -> None:
    project = factory.project(
        base_policy=str(tiny_dir), max_new_tokens=MAX_NEW_TOKENS, best_of_k=K,
        responses_per_prompt=3,
    )  # fmt: skip
    ids = add_prompts(session, project, 2)
    run = execute(session, settings, project, {})
    assert "best-of-K off" in run.log_tail and "no active one" in run.log_tail
    assert run.result["responses"] == 6 and run.result["pairs"] == 6
    assert "best_of_k" not in run.result
    for prompt_id in ids:
        assert len(rows_of(session, Response, prompt_id)) == 3
        assert len(rows_of(session, ComparisonPair, prompt_id)) == 3


def test_best_of_k_of_two_or_less_keeps_todays_behaviour_with_a_reward_model(
    session: Session, settings: Settings, factory: Factory, tiny_dir: Path, rm_dir: Path
) -> None:
    project = factory.project(
        base_policy=str(tiny_dir), max_new_tokens=MAX_NEW_TOKENS, responses_per_prompt=3
    )
    add_prompts(session, project, 2)
    add_reward_model(session, project, rm_dir)
    run = execute(session, settings, project, {"best_of_k": 2})
    assert run.result["responses"] == 6 and run.result["pairs"] == 6
    assert "best-of-K" not in run.log_tail and "best_of_k" not in run.result
    stored = session.scalars(sa.select(Response)).all()
    assert all("best_of" not in r.generation_params for r in stored)


def test_version_eval_pairs_compare_plain_samples_not_the_reward_models_pick(
    session: Session,
    settings: Settings,
    factory: Factory,
    tiny_dir: Path,
    rm_dir: Path,
    tmp_path: Path,
) -> None:
    project = factory.project(
        base_policy=str(tiny_dir), max_new_tokens=MAX_NEW_TOKENS, best_of_k=K,
        version_eval_rate=1.0,
    )  # fmt: skip
    ids = add_prompts(session, project, 3)
    add_reward_model(session, project, rm_dir)
    execute(session, settings, project, {"batch_size": K})  # the base policy, best-of-K
    base = registry.active_policy(session, project, settings)
    tuned = registry.create_version(
        session, project, "policy", base_model=base.base_model,
        artifact_path=str(save_tiny_model(tmp_path / "tuned", seed=1)), parent=base,
    )  # fmt: skip
    registry.activate(session, tuned)
    session.commit()
    run = execute(session, settings, project, {"batch_size": K})

    assert run.result["version_eval_pairs"] == 3
    for prompt_id in ids:
        pairs = rows_of(session, ComparisonPair, prompt_id)
        [evaluation] = [p for p in pairs if p.kind == "version_eval"]
        ours = session.get(Response, evaluation.response_a_id)
        theirs = session.get(Response, evaluation.response_b_id)
        assert ours is not None and theirs is not None
        assert (ours.model_version_id, theirs.model_version_id) == (tuned.id, base.id)
        # Each side is its policy's first candidate, whatever the reward model made of it.
        assert ours.generation_params["best_of"]["candidate"] == 0
        assert theirs.generation_params.get("best_of", {"candidate": 0})["candidate"] == 0
        assert [p.kind for p in pairs].count("standard") == 2  # one pair of each policy


def test_a_reward_model_id_that_is_not_one_is_refused_at_creation(
    session: Session, settings: Settings, factory: Factory, tiny_dir: Path
) -> None:
    project = factory.project(base_policy=str(tiny_dir))
    policy = registry.active_policy(session, project, settings)
    session.commit()
    with pytest.raises(InvalidInput, match="is not a reward model of project"):
        runs.create_run(
            session, project, "generate", {"reward_model_id": policy.id}, settings=settings
        )
    with pytest.raises(InvalidInput) as caught:
        runs.create_run(session, project, "generate", {"pair_selection": "best"}, settings=settings)
    assert [e.field for e in caught.value.errors] == ["config.pair_selection"]
    with pytest.raises(InvalidInput) as caught:
        projects.update_project(session, project, settings={"best_of_k": 17})
    assert [e.field for e in caught.value.errors] == ["settings.best_of_k"]
