"""Generation runs: the active policy answers prompts K times; the answers become pairs.

Responses and their comparison pairs are committed prompt by prompt, as soon as a prompt's K
responses exist, so raters can start judging long before the run ends. A run is resumable: it
always works on "prompts still lacking responses from the active policy", so running it again
after a crash continues where it stopped and never duplicates a prompt's responses.

When a trained (non-base) policy is active, a share of the prompts (`version_eval_rate`) also
gets a `version_eval` pair of "new policy vs the previous one", for human evaluation of versions;
a prompt the previous policy never answered gets one answer from it at the end of the run.
"""

from __future__ import annotations

import gc
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ComparisonPair, ModelVersion, Project, Prompt, Response, Run
from app.services import registry, runs
from app.services.errors import FieldError, InvalidInput
from app.services.projects import ProjectSettings, project_settings
from app.services.prompts import prompt_messages

if TYPE_CHECKING:  # torch-heavy; imported inside the run only, never in the web process
    from app.ml.generation import GeneratedResponse, SamplingConfig
    from app.ml.hooks import Hooks

logger = logging.getLogger(__name__)

UPLOADED_RESPONSES_ENOUGH = 2
MAX_IDS_IN_SQL = 500


class GenerationConfig(BaseModel):
    """The `config` of a `generate` run; unset sampling fields take the project's settings."""

    model_config = ConfigDict(extra="forbid")

    prompt_ids: list[int] | None = Field(
        None, description="only these prompts (default: every prompt lacking responses)"
    )
    limit: int | None = Field(None, ge=1, description="at most this many prompts")
    responses_per_prompt: int | None = Field(None, ge=2, le=8, description="K")
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    batch_size: int = Field(16, ge=1, le=1024, description="sequences decoded together")
    first_batch_prompts: int = Field(
        0, ge=0, le=64, description="if > 0, a first small batch so the first pairs land early"
    )
    seed: int | None = Field(None, description="sampling seed (default: the run id)")


def validate_generation_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    """Check a `generate` run's config (422 with field errors) and return it normalised."""
    try:
        parsed = GenerationConfig.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput(
            "invalid generate config",
            [
                FieldError(None, "config." + ".".join(str(p) for p in e["loc"]), e["msg"])
                for e in exc.errors()
            ],
        ) from exc
    if parsed.prompt_ids:
        wanted = set(parsed.prompt_ids)
        found: set[int] = set()
        ids = sorted(wanted)
        for start in range(0, len(ids), 500):
            found.update(
                session.scalars(
                    select(Prompt.id).where(
                        Prompt.project_id == project.id, Prompt.id.in_(ids[start : start + 500])
                    )
                )
            )
        missing = sorted(wanted - found)
        if missing:
            raise InvalidInput(
                f"{len(missing)} prompt id(s) are not prompts of project {project.slug!r}",
                [FieldError(None, "config.prompt_ids", f"unknown: {missing[:20]}")],
            )
    return parsed.model_dump(exclude_none=True)


def queue_generation_after_upload(
    session: Session,
    project: Project,
    prompt_ids: list[int],
    *,
    settings: Settings,
    actor_id: int | None = None,
) -> Run | None:
    """After an upload, queue a generation run for its new prompts (project `auto_generate`).

    Prompts that came with at least two responses of their own are already comparable and are
    left out; None when nothing needs generating. A broker failure does not undo the upload:
    the run is returned marked failed with the broker's error.
    """
    if not prompt_ids or not project_settings(project).auto_generate:
        return None
    counts: dict[int, int] = {}
    for start in range(0, len(prompt_ids), 500):
        chunk = prompt_ids[start : start + 500]
        rows = session.execute(
            select(Response.prompt_id, func.count())
            .where(Response.prompt_id.in_(chunk))
            .group_by(Response.prompt_id)
        )
        counts.update({pid: n for pid, n in rows})
    session.commit()
    needy = [pid for pid in prompt_ids if counts.get(pid, 0) < UPLOADED_RESPONSES_ENOUGH]
    if not needy:
        return None
    try:
        return runs.create_run(
            session,
            project,
            "generate",
            {"prompt_ids": needy},
            settings=settings,
            actor_id=actor_id,
            trigger="upload",
        )
    except runs.BrokerUnavailable:
        logger.exception("prompts stored, but the generation run could not be queued")
        return session.scalar(
            select(Run).where(Run.project_id == project.id).order_by(Run.id.desc()).limit(1)
        )


# --- the run ---------------------------------------------------------------------------------


@dataclass
class _Todo:
    prompt_id: int
    messages: list[dict[str, str]]
    existing: list[int]  # ids of this policy's responses the prompt already has
    needed: int


def prompts_needing_responses(
    session: Session, project: Project, policy: ModelVersion, k: int, cfg: GenerationConfig
) -> list[_Todo]:
    """Prompts with fewer than K responses from `policy`, oldest first."""
    have = (
        select(Response.prompt_id, func.count().label("n"))
        .where(Response.model_version_id == policy.id)
        .group_by(Response.prompt_id)
        .subquery()
    )
    query = (
        select(Prompt)
        .outerjoin(have, have.c.prompt_id == Prompt.id)
        .where(Prompt.project_id == project.id, func.coalesce(have.c.n, 0) < k)
        .order_by(Prompt.id)
    )
    wanted = set(cfg.prompt_ids) if cfg.prompt_ids is not None else None
    # A long id list (an upload of many prompts) would exceed SQLite's bound-parameter limit;
    # filter it here instead.
    in_sql = wanted is not None and len(wanted) <= MAX_IDS_IN_SQL
    if in_sql:
        query = query.where(Prompt.id.in_(sorted(wanted or ())))
    if cfg.limit is not None and (wanted is None or in_sql):
        query = query.limit(cfg.limit)
    prompts = list(session.scalars(query))
    if wanted is not None and not in_sql:
        prompts = [p for p in prompts if p.id in wanted][: cfg.limit]
    existing: dict[int, list[int]] = {}
    ids = [p.id for p in prompts]
    for start in range(0, len(ids), MAX_IDS_IN_SQL):
        for pid, rid in session.execute(
            select(Response.prompt_id, Response.id)
            .where(
                Response.model_version_id == policy.id,
                Response.prompt_id.in_(ids[start : start + MAX_IDS_IN_SQL]),
            )
            .order_by(Response.id)
        ):
            existing.setdefault(pid, []).append(rid)
    return [
        _Todo(p.id, prompt_messages(p), existing.get(p.id, []), k - len(existing.get(p.id, [])))
        for p in prompts
    ]


def execute_generation_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `generate` run handler: load the active policy, answer, store, pair."""
    from app.ml.generation import SamplingConfig
    from app.ml.hooks import Cancelled

    session, settings, hooks = ctx.session, ctx.settings, ctx.hooks
    project = session.get(Project, ctx.project_id)
    assert project is not None, f"project {ctx.project_id} vanished"
    cfg = GenerationConfig.model_validate(ctx.config)
    ps = project_settings(project)
    policy = registry.active_policy(session, project, settings)
    k = cfg.responses_per_prompt or ps.responses_per_prompt
    sampling = SamplingConfig(
        num_responses=k,
        temperature=cfg.temperature or ps.temperature,
        top_p=cfg.top_p or ps.top_p,
        max_new_tokens=cfg.max_new_tokens or ps.max_new_tokens,
        batch_size=cfg.batch_size,
        do_sample=(cfg.temperature or ps.temperature) > 0,
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
    store = _Store(
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
    started = time.perf_counter()
    loaded = _load(spec, settings, ctx.log)
    if hooks.should_stop():
        raise Cancelled("cancelled while loading the model")

    done = 0
    step = 0
    for batch in _batches(todo, cfg, k):
        chunk_hooks = _ChunkHooks(hooks, done, len(todo), step)
        _generate(loaded, batch, sampling, chunk_hooks, store.save)
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


def _load(spec: str, settings: Settings, log: Callable[[str], None]) -> Any:
    from app.ml.loading import load_causal_lm

    t0 = time.perf_counter()
    log(f"loading model {spec}")
    loaded = load_causal_lm(spec, settings.artifacts_dir, allow_hub=settings.allow_hub_downloads)
    log(
        f"model loaded in {time.perf_counter() - t0:.1f}s on {loaded.device}"
        + (f" ({'; '.join(loaded.adjustments)})" if loaded.adjustments else "")
    )
    return loaded


def _batches(todo: list[_Todo], cfg: GenerationConfig, k: int) -> Iterator[list[_Todo]]:
    """Prompts in call-sized groups of equal `needed`: a small first group when asked (the
    first pairs then land after one short decode), then groups that fill `batch_size` rows."""
    per_batch = max(1, cfg.batch_size // k)
    first = cfg.first_batch_prompts
    index = 0
    for needed, group_iter in itertools.groupby(todo, key=lambda t: t.needed):
        group = list(group_iter)
        del needed
        start = 0
        while start < len(group):
            size = first if (index == 0 and first > 0) else per_batch
            yield group[start : start + size]
            start += size
            index += 1


def _generate(
    loaded: Any,
    batch: list[_Todo],
    sampling: SamplingConfig,
    hooks: _ChunkHooks,
    save: Callable[[_Todo, list[GeneratedResponse]], None],
) -> None:
    from dataclasses import replace

    from app.ml.generation import generate_responses

    # Row seeds derive from (seed, index within the call); mixing in the first prompt id keeps
    # different calls from reusing the same random streams.
    config = replace(
        sampling, num_responses=batch[0].needed, seed=sampling.seed * 1_000_003 + batch[0].prompt_id
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


def storable_text(text: str) -> str:
    """Model output as a database can hold it: PostgreSQL text cannot contain NUL characters,
    which a model can emit (byte-level tokenizers decode any byte), so they become U+FFFD."""
    return text.replace("\x00", "\ufffd")


@dataclass
class _Store:
    """Writes one prompt's responses and pairs in one short transaction."""

    session: Session
    project: Project
    policy: ModelVersion
    previous: ModelVersion | None
    run_id: int
    settings: ProjectSettings
    params: dict[str, Any]
    responses: int = 0
    pairs: int = 0
    eval_pairs: int = 0
    truncated: int = 0
    skipped: int = 0
    backfill: list[tuple[_Todo, int]] = field(default_factory=list)

    def save(self, todo: _Todo, generated: list[GeneratedResponse]) -> None:
        session = self.session
        # Serialise writers per prompt (a no-op on SQLite, whose transactions hold the write
        # lock), then re-count: another run may have answered this prompt meanwhile.
        session.execute(select(Prompt.id).where(Prompt.id == todo.prompt_id).with_for_update())
        existing = list(
            session.scalars(
                select(Response.id)
                .where(
                    Response.prompt_id == todo.prompt_id,
                    Response.model_version_id == self.policy.id,
                )
                .order_by(Response.id)
            )
        )
        if len(existing) != len(todo.existing):
            session.rollback()
            self.skipped += 1
            return
        rows = [
            Response(
                prompt_id=todo.prompt_id,
                text=storable_text(g.text),
                model_version_id=self.policy.id,
                model_name=self.policy.name,
                truncated=g.truncated,
                generation_params={
                    **self.params,
                    "finish_reason": g.finish_reason,
                    "num_tokens": g.num_tokens,
                },
            )
            for g in generated
        ]
        session.add_all(rows)
        session.flush()
        new_ids = [r.id for r in rows]
        for a, b in [*itertools.product(existing, new_ids), *itertools.combinations(new_ids, 2)]:
            self._pair(todo.prompt_id, a, b, "standard")
        self.responses += len(rows)
        self.truncated += sum(1 for g in generated if g.truncated)
        if self.previous is not None and self._wants_eval(todo.prompt_id):
            theirs = session.scalar(
                select(Response.id)
                .where(
                    Response.prompt_id == todo.prompt_id,
                    Response.model_version_id == self.previous.id,
                )
                .order_by(Response.id.desc())
                .limit(1)
            )
            if theirs is None:
                self.backfill.append((todo, new_ids[0]))
            else:
                self._pair(todo.prompt_id, new_ids[0], theirs, "version_eval")
        session.commit()

    def save_previous(self, todo: _Todo, ours: int, generated: GeneratedResponse) -> None:
        assert self.previous is not None
        row = Response(
            prompt_id=todo.prompt_id,
            text=storable_text(generated.text),
            model_version_id=self.previous.id,
            model_name=self.previous.name,
            truncated=generated.truncated,
            generation_params={
                **self.params,
                "model": registry.model_spec(self.previous),
                "policy_version": self.previous.version,
                "finish_reason": generated.finish_reason,
                "num_tokens": generated.num_tokens,
                "purpose": "version_eval",
            },
        )
        self.session.add(row)
        self.session.flush()
        self._pair(todo.prompt_id, ours, row.id, "version_eval")
        self.session.commit()

    def _wants_eval(self, prompt_id: int) -> bool:
        # Seeded per (run, prompt): a resumed run picks the same prompts.
        draw = random.Random(f"{self.run_id}:{prompt_id}").random()
        return draw < self.settings.version_eval_rate

    def _pair(self, prompt_id: int, a: int, b: int, kind: str) -> None:
        self.session.add(
            ComparisonPair(
                project_id=self.project.id,
                prompt_id=prompt_id,
                response_a_id=a,
                response_b_id=b,
                required_judgments=self.settings.overlap,
                kind=kind,
            )
        )
        self.pairs += 1
        if kind == "version_eval":
            self.eval_pairs += 1

    def summary(self) -> dict[str, Any]:
        return {
            "responses": self.responses,
            "pairs": self.pairs,
            "version_eval_pairs": self.eval_pairs,
            "truncated": self.truncated,
            "skipped_prompts": self.skipped,
        }


def _backfill_previous(
    store: _Store,
    previous: ModelVersion,
    sampling: SamplingConfig,
    settings: Settings,
    hooks: Hooks,
    log: Callable[[str], None],
) -> None:
    """Answer the version-eval prompts the previous policy never saw, once each."""
    from dataclasses import replace

    from app.ml.generation import generate_responses

    items = list(store.backfill)
    log(f"version eval: {len(items)} prompt(s) need an answer from policy v{previous.version}")
    loaded = _load(registry.model_spec(previous), settings, log)
    config = replace(sampling, num_responses=1, seed=sampling.seed + 7)
    generate_responses(
        loaded,
        [todo.messages for todo, _ in items],
        config,
        _LogOnlyHooks(hooks, log),
        on_prompt_done=lambda i, out: store.save_previous(items[i][0], items[i][1], out[0]),
    )
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
