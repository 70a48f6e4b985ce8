"""The `generate` run: load the active policy, answer prompts K times, store answers and pairs.

Each prompt's answers and pairs are committed as soon as they exist (raters start early); the
run always works on "prompts still lacking answers from the active policy", so a rerun after a
crash continues where it stopped and never answers a prompt twice.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from app.core.config import Settings
from app.jobs.runner import RunContext
from app.kinds.generate import GenerateRunConfig, SamplingConfig
from app.ml.generation import GeneratedResponse, generate_responses
from app.ml.hooks import Cancelled, Hooks
from app.ml.loading import LoadedModel, load_causal_lm
from app.models import ModelVersion
from app.services import registry
from app.services.generation import PromptTodo, ResponseStore, prompts_needing_responses
from app.services.projects import project_settings


def run(ctx: RunContext) -> dict[str, Any]:
    """Load the active policy, answer, store, pair."""
    session, settings, hooks = ctx.session, ctx.settings, ctx.hooks
    project = ctx.project()
    cfg = ctx.config_as(GenerateRunConfig)
    ps = project_settings(project)
    policy = registry.active_policy(session, project, settings)
    k = cfg.responses_per_prompt or ps.responses_per_prompt
    temperature = cfg.temperature or ps.temperature
    sampling = SamplingConfig(
        num_responses=k,
        temperature=temperature,
        top_p=cfg.top_p or ps.top_p,
        max_new_tokens=cfg.max_new_tokens or ps.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=temperature > 0,
        seed=cfg.seed if cfg.seed is not None else ctx.run_id,
    )
    todo = prompts_needing_responses(session, project, policy, k, cfg)
    previous = registry.previous_policy(session, policy) if policy.version > 0 else None
    spec = registry.model_spec(policy)
    session.commit()  # no transaction may stay open while the model loads and decodes

    if not todo:
        hooks.progress(0, 0, f"nothing to generate: every prompt has {k} responses")
        return {"prompts": 0, "responses": 0, "pairs": 0, "policy_version": policy.version}
    hooks.progress(0, len(todo), f"{len(todo)} prompts x K={k} from policy v{policy.version}")
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
    )

    def save(todo_item: PromptTodo, generated: list[GeneratedResponse]) -> None:
        store.save(todo_item, generated)
        session.commit()  # this prompt's pairs are ready for raters now

    started = time.perf_counter()
    loaded = _load(spec, settings, ctx.log)
    if hooks.should_stop():
        raise Cancelled("cancelled while loading the model")

    done = 0
    step = 0
    for batch in _batches(todo, cfg, k):
        chunk_hooks = _ChunkHooks(hooks, done, len(todo), step)
        _generate(loaded, batch, sampling, chunk_hooks, save)
        done += len(batch)
        step = chunk_hooks.next_step
    del loaded
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
    return result


def _load(spec: str, settings: Settings, log: Callable[[str], None]) -> LoadedModel:
    t0 = time.perf_counter()
    log(f"loading model {spec}")
    loaded = load_causal_lm(spec, settings.artifacts_dir, allow_hub=settings.allow_hub_downloads)
    log(
        f"model loaded in {time.perf_counter() - t0:.1f}s on {loaded.device}"
        + (f" ({'; '.join(loaded.adjustments)})" if loaded.adjustments else "")
    )
    return loaded


def _batches(todo: list[PromptTodo], cfg: GenerateRunConfig, k: int) -> Iterator[list[PromptTodo]]:
    """Prompts in call-sized groups of equal `needed`: a small first group when asked (the
    first pairs then land after one short decode), then groups that fill `batch_size` rows."""
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
    # Row seeds derive from (seed, index within the call); mixing in the first prompt id keeps
    # different calls from reusing the same random streams.
    config = sampling.model_copy(
        update={
            "num_responses": batch[0].needed,
            "seed": sampling.seed * 1_000_003 + batch[0].prompt_id,
        }
    )
    generate_responses(
        loaded,
        [t.messages for t in batch],
        config,
        hooks,
        on_prompt_done=lambda i, responses: save(batch[i], responses),
    )


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
