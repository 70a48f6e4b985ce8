"""The `generate` run: load the active policy, answer prompts K times, store answers and pairs.

Each prompt's answers and pairs are committed as soon as they exist (raters start early); the
run always works on "prompts still lacking answers from the active policy", so a rerun after a
crash continues where it stopped and never answers a prompt twice.

Best-of-K (`best_of_k` > 2): the reward model is loaded next to the policy, once per run; each
decode call's K answers per prompt are scored together (`app.ml.best_of_scoring`), and the
store keeps the top one and the `pair_selection` contrast (`ResponseStore.save_best_of`). The
pairs of a call are then committed when its scoring ends. Without a reward model the run
generates as it does without best-of, and its log says so.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.jobs.runner import RunContext
from app.kinds.generate import GenerateRunConfig, SamplingConfig
from app.kinds.pairs import PairRule
from app.ml.best_of_scoring import score_answer_groups
from app.ml.generation import GeneratedResponse, generate_responses
from app.ml.hooks import Cancelled, Hooks
from app.ml.loading import LoadedModel, load_causal_lm
from app.ml.reward import LoadedRewardModel, load_reward_model
from app.models import ModelVersion, Project
from app.services import registry
from app.services.generation import (
    BestOf,
    PromptTodo,
    ResponseStore,
    best_of_reward_model,
    prompts_needing_responses,
)
from app.services.projects import ProjectSettings, project_settings

# What a best-of-K run stores per prompt: one pair.
BEST_OF_KEPT = 2


@dataclass(frozen=True)
class _Plan:
    """How many answers a prompt gets sampled and stored, and what scores them (best-of-K)."""

    stored: int  # answers a prompt has when it is done
    sampled: int  # answers sampled per prompt (K)
    rule: PairRule | None = None
    reward: ModelVersion | None = None


def run(ctx: RunContext) -> dict[str, Any]:
    """Load the active policy (and, for best-of-K, the reward model), answer, store, pair."""
    session, settings, hooks = ctx.session, ctx.settings, ctx.hooks
    project = ctx.project()
    cfg = ctx.config_as(GenerateRunConfig)
    ps = project_settings(project)
    policy = registry.active_policy(session, project, settings)
    plan, note = _plan(session, project, ps, cfg)
    temperature = cfg.temperature or ps.temperature
    sampling = SamplingConfig(
        num_responses=plan.sampled,
        temperature=temperature,
        top_p=cfg.top_p or ps.top_p,
        max_new_tokens=cfg.max_new_tokens or ps.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=temperature > 0,
        seed=cfg.seed if cfg.seed is not None else ctx.run_id,
    )
    todo = prompts_needing_responses(session, project, policy, plan.stored, cfg)
    previous = registry.previous_policy(session, policy) if policy.version > 0 else None
    spec = registry.model_spec(policy)
    reward_path = plan.reward.artifact_path if plan.reward is not None else None
    session.commit()  # no transaction may stay open while the model loads and decodes
    if note:
        hooks.log(note)

    if not todo:
        hooks.progress(0, 0, f"nothing to generate: every prompt has {plan.stored} responses")
        return {"prompts": 0, "responses": 0, "pairs": 0, "policy_version": policy.version}
    hooks.progress(
        0, len(todo), f"{len(todo)} prompts x K={plan.sampled} from policy v{policy.version}"
    )
    best_of = None
    if plan.reward is not None:
        assert plan.rule is not None
        best_of = BestOf(plan.sampled, plan.rule, plan.reward.id, sampling.seed)
    store = ResponseStore(
        session=session,
        project=project,
        policy=policy,
        previous=previous,
        run_id=ctx.run_id,
        settings=ps,
        params={
            "run_id": ctx.run_id,
            "model": spec,
            "policy_version": policy.version,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": sampling.seed,
        },
        best_of=best_of,
    )

    def save(todo_item: PromptTodo, generated: list[GeneratedResponse]) -> None:
        store.save(todo_item, generated)
        session.commit()  # this prompt's pairs are ready for raters now

    started = time.perf_counter()
    loaded = _load(spec, settings, ctx.log)
    reward = None
    if reward_path is not None:
        reward = _load_reward(reward_path, loaded, ctx.log)
        if not sampling.do_sample:
            hooks.log("best-of-K with greedy decoding (temperature 0): all K answers are equal")
    if hooks.should_stop():
        raise Cancelled("cancelled while loading the model")

    done = 0
    step = 0
    for batch in _batches(todo, cfg, plan.sampled):
        chunk_hooks = _ChunkHooks(hooks, done, len(todo), step)
        if reward is None:
            _generate(loaded, batch, sampling, chunk_hooks, save)
        else:
            _generate_best_of(loaded, reward, batch, sampling, chunk_hooks, store)
        done += len(batch)
        step = chunk_hooks.next_step
    del loaded, reward
    gc.collect()

    if store.backfill and previous is not None:
        _backfill_previous(store, previous, sampling, settings, hooks, ctx.log)
    seconds = time.perf_counter() - started
    result = store.summary()
    result.update(policy_version=policy.version, seconds=round(seconds, 1))
    hooks.log(
        f"stored {result['responses']} responses and {result['pairs']} pairs"
        f" ({result['truncated']} truncated) in {seconds:.0f}s"
    )
    if best_of is not None:
        gap = result["mean_score_gap"]
        hooks.log(
            f"best-of-K: K={best_of.k}, pair_selection={best_of.rule}, reward model"
            f" v{plan.reward.version if plan.reward else '?'}: mean top score"
            f" {_fmt(result['mean_top_score'])}, mean top-vs-contrast gap {_fmt(gap)}"
        )
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _plan(
    session: Session, project: Project, ps: ProjectSettings, cfg: GenerateRunConfig
) -> tuple[_Plan, str]:
    """The run's K and, for best-of-K, its rule and reward model; and the line for the log that
    says which (or that best-of-K is off for want of a reward model)."""
    per_prompt = cfg.responses_per_prompt or ps.responses_per_prompt
    best_k = cfg.best_of_k if cfg.best_of_k is not None else ps.best_of_k
    if best_k <= BEST_OF_KEPT:
        return _Plan(stored=per_prompt, sampled=per_prompt), ""
    rule = cfg.pair_selection or ps.pair_selection
    reward = best_of_reward_model(session, project, cfg.reward_model_id)
    if reward is None:
        return _Plan(stored=per_prompt, sampled=per_prompt), (
            f"best-of-K off: best_of_k={best_k} asks for a reward model and the project has no"
            f" active one; storing K={per_prompt} answers per prompt, all paired"
        )
    note = (
        f"best-of-K: K={best_k} answers per prompt scored by reward model v{reward.version}"
        f" (id {reward.id}); keeping the top one and its {rule} contrast as one pair"
    )
    return _Plan(stored=BEST_OF_KEPT, sampled=best_k, rule=rule, reward=reward), note


def _load(spec: str, settings: Settings, log: Callable[[str], None]) -> LoadedModel:
    t0 = time.perf_counter()
    log(f"loading model {spec}")
    loaded = load_causal_lm(spec, settings.artifacts_dir, allow_hub=settings.allow_hub_downloads)
    log(
        f"model loaded in {time.perf_counter() - t0:.1f}s on {loaded.device}"
        + (f" ({'; '.join(loaded.adjustments)})" if loaded.adjustments else "")
    )
    return loaded


def _load_reward(path: str, policy: LoadedModel, log: Callable[[str], None]) -> LoadedRewardModel:
    t0 = time.perf_counter()
    log(f"loading reward model {path}")
    reward = load_reward_model(path, policy.device, dtype=policy.dtype)
    log(f"reward model loaded in {time.perf_counter() - t0:.1f}s")
    return reward


def _batches(todo: list[PromptTodo], cfg: GenerateRunConfig, k: int) -> Iterator[list[PromptTodo]]:
    """Prompts in call-sized groups of equal `needed`: a small first group when asked (the
    first pairs then land after one short decode), then groups that fill `batch_size` rows
    (`k`: rows per prompt)."""
    per_batch = max(1, cfg.batch_size // k)
    first = cfg.first_batch_prompts
    index = 0
    for _, group_iter in itertools.groupby(todo, key=lambda t: t.needed):
        group = list(group_iter)
        start = 0
        while start < len(group):
            size = first if (index == 0 and first > 0) else per_batch
            yield group[start : start + size]
            start += size
            index += 1


def _generate(
    loaded: LoadedModel,
    batch: list[PromptTodo],
    sampling: SamplingConfig,
    hooks: _ChunkHooks,
    save: Callable[[PromptTodo, list[GeneratedResponse]], None],
) -> None:
    config = sampling.model_copy(
        update={
            "num_responses": batch[0].needed,
            "seed": call_seed(sampling.seed, batch[0].prompt_id),
        }
    )
    generate_responses(
        loaded,
        [t.messages for t in batch],
        config,
        hooks,
        on_prompt_done=lambda i, responses: save(batch[i], responses),
    )


def call_seed(seed: int, first_prompt_id: int) -> int:
    """The sampling seed of one decode call. Row seeds derive from (seed, index within the
    call); mixing in the call's first prompt id keeps different calls from reusing the same
    random streams."""
    return seed * 1_000_003 + first_prompt_id


def _generate_best_of(
    loaded: LoadedModel,
    reward: LoadedRewardModel,
    batch: list[PromptTodo],
    sampling: SamplingConfig,
    hooks: _ChunkHooks,
    store: ResponseStore,
) -> None:
    """Sample K answers per prompt of `batch`, score them all in packed rows, keep each
    prompt's pair. A cancel during the call stores none of its prompts (whole prompts only)."""
    config = sampling.model_copy(update={"seed": call_seed(sampling.seed, batch[0].prompt_id)})
    candidates = generate_responses(loaded, [t.messages for t in batch], config, hooks)
    scores = score_answer_groups(
        reward,
        [t.messages for t in batch],
        [[a.text for a in answers] for answers in candidates],
        rows_per_forward=max(1, sampling.batch_size // sampling.num_responses),
    )
    for todo_item, answers, answer_scores in zip(batch, candidates, scores, strict=True):
        store.save_best_of(todo_item, answers, answer_scores)
        store.session.commit()  # this prompt's pair is ready for raters now


class _ChunkHooks:
    """Reports one call's progress and metric steps as part of the whole run."""

    def __init__(self, hooks: Hooks, done_before: int, total: int, step_offset: int) -> None:
        self.hooks = hooks
        self.done_before = done_before
        self.total = total
        self.step_offset = step_offset
        self.next_step = step_offset

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        self.hooks.progress(self.done_before + done, self.total, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.hooks.metrics(self.step_offset + step, values)
        self.next_step = max(self.next_step, self.step_offset + step + 1)

    def should_stop(self) -> bool:
        return self.hooks.should_stop()


def _backfill_previous(
    store: ResponseStore,
    previous: ModelVersion,
    sampling: SamplingConfig,
    settings: Settings,
    hooks: Hooks,
    log: Callable[[str], None],
) -> None:
    """Answer the version-eval prompts the previous policy never saw, once each."""
    items = list(store.backfill)
    log(f"version eval: {len(items)} prompt(s) need an answer from policy v{previous.version}")
    loaded = _load(registry.model_spec(previous), settings, log)
    config = sampling.model_copy(update={"num_responses": 1, "seed": sampling.seed + 7})

    def save(i: int, out: list[GeneratedResponse]) -> None:
        store.save_previous(items[i][0], items[i][1], out[0])
        store.session.commit()

    generate_responses(
        loaded, [todo.messages for todo, _ in items], config, _LogOnlyHooks(hooks, log),
        on_prompt_done=save,
    )  # fmt: skip
    del loaded
    gc.collect()


class _LogOnlyHooks:
    """Keeps the run's progress bar where it is (all prompts done) during the backfill."""

    def __init__(self, hooks: Hooks, log: Callable[[str], None]) -> None:
        self.hooks = hooks
        self.log = log

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        if message:
            self.log(f"version eval: {message}")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        return self.hooks.should_stop()
