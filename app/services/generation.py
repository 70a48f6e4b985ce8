"""Generation: which prompts need answers, and storing answers with their comparison pairs.

The worker side of a `generate` run (loading the policy, decoding in batches) is
`app.jobs.generate`; this module is what it and the upload routes share with the database.

Responses and their comparison pairs are committed prompt by prompt, as soon as a prompt's K
responses exist, so raters can start judging long before the run ends. A run is resumable: it
always works on "prompts still lacking responses from the active policy", so running it again
after a crash continues where it stopped and never duplicates a prompt's responses.

When a trained (non-base) policy is active, a share of the prompts (`version_eval_rate`) also
gets a `version_eval` pair of "new policy vs the previous one", for human evaluation of versions;
a prompt the previous policy never answered gets one answer from it at the end of the run.

Best-of-K (`best_of_k` > 2, a project setting and a run knob): the policy samples K answers per
prompt, the reward model scores them, and only two are stored, the reward model's top answer and
a contrasting one picked by `pair_selection` (`app.kinds.pairs`), as the prompt's one pair. Raters
then see the policy's best answers sooner, against a contrast the rule chooses, and their queue
holds one pair per prompt. The two kept answers record every candidate's score and their own
(`generation_params["best_of"]`). A prompt counts as answered once it has two answers from the
policy, so resuming works as without best-of. Without a reward model to score with, the run
generates as without best-of and its log says so (`best_of_reward_model`).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.generate import GenerateRunConfig
from app.kinds.pairs import PairRule, choose_pair
from app.models import ComparisonPair, ModelVersion, Project, Prompt, Response, Run
from app.services import policy_runs, registry, runs
from app.services.errors import FieldError, InvalidInput
from app.services.projects import ProjectSettings, project_settings
from app.services.prompts import prompt_messages

logger = logging.getLogger(__name__)

UPLOADED_RESPONSES_ENOUGH = 2
MAX_IDS_IN_SQL = 500


def validate_generate_config(
    session: Session, project: Project, config: GenerateRunConfig
) -> GenerateRunConfig:
    """Check that a `generate` run's prompts belong to the project (422 naming the others), and
    that its `reward_model_id`, when given, is a usable reward model of the project."""
    if config.reward_model_id is not None:
        policy_runs.reward_version(session, project, config.reward_model_id)
    if config.prompt_ids:
        wanted = set(config.prompt_ids)
        found: set[int] = set()
        ids = sorted(wanted)
        for start in range(0, len(ids), MAX_IDS_IN_SQL):
            found.update(
                session.scalars(
                    select(Prompt.id).where(
                        Prompt.project_id == project.id,
                        Prompt.id.in_(ids[start : start + MAX_IDS_IN_SQL]),
                    )
                )
            )
        missing = sorted(wanted - found)
        if missing:
            raise InvalidInput(
                f"{len(missing)} prompt id(s) are not prompts of project {project.slug!r}",
                [FieldError(None, "config.prompt_ids", f"unknown: {missing[:20]}")],
            )
    return config


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
    the run is then marked failed with the broker's error after the caller's commit.
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
    needy = [pid for pid in prompt_ids if counts.get(pid, 0) < UPLOADED_RESPONSES_ENOUGH]
    if not needy:
        return None
    return runs.create_run(
        session,
        project,
        "generate",
        {"prompt_ids": needy},
        settings=settings,
        actor_id=actor_id,
        trigger="upload",
        broker_errors_fail_commit=False,
    )


def active_generation(session: Session, project: Project) -> Run | None:
    """The project's generation run that is running (else the oldest queued one), if any: what
    the rater page tells raters who have nothing to judge while answers are being written."""
    return session.scalar(
        select(Run)
        .where(
            Run.project_id == project.id,
            Run.kind == "generate",
            Run.status.in_(("queued", "running")),
        )
        .order_by((Run.status == "running").desc(), Run.id)
        .limit(1)
    )


def best_of_reward_model(
    session: Session, project: Project, reward_model_id: int | None
) -> ModelVersion | None:
    """The reward model a best-of-K run scores with: the given one (an error when it is not a
    usable reward model of the project), else the project's active one; None when there is no
    active one, and the run then generates as without best-of."""
    if reward_model_id is not None:
        return policy_runs.reward_version(session, project, reward_model_id)
    version = policy_runs.active_reward_version(session, project)
    if version is None or not version.artifact_path:
        return None
    return version


# --- what a generation run works on, and how its answers are stored ---------------------------


@dataclass
class PromptTodo:
    prompt_id: int
    messages: list[dict[str, str]]
    existing: list[int]  # ids of this policy's responses the prompt already has
    needed: int


def prompts_needing_responses(
    session: Session, project: Project, policy: ModelVersion, k: int, cfg: GenerateRunConfig
) -> list[PromptTodo]:
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
    todo = []
    for p in prompts:
        have_ids = existing.get(p.id, [])
        todo.append(PromptTodo(p.id, prompt_messages(p), have_ids, k - len(have_ids)))
    return todo


def storable_text(text: str) -> str:
    """Model output as a database can hold it: PostgreSQL text cannot contain NUL characters,
    which a model can emit (byte-level tokenizers decode any byte), so they become U+FFFD."""
    return text.replace("\x00", "\ufffd")


class Answer(Protocol):
    """One generated answer as the store reads it (`app.ml.generation.GeneratedResponse`)."""

    @property
    def text(self) -> str: ...
    @property
    def truncated(self) -> bool: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def num_tokens(self) -> int: ...


@dataclass(frozen=True)
class BestOf:
    """How a best-of-K run keeps a pair from each prompt's K scored answers."""

    k: int
    rule: PairRule
    reward_model_id: int
    seed: int  # seeds `top_random`'s draw per prompt, so a resumed run draws the same


@dataclass
class ResponseStore:
    """Adds a prompt's answers and their comparison pairs; the caller commits after each
    prompt, so raters can judge the first pairs while the run goes on.

    With `best_of` set, `save_best_of` takes all K answers and their reward-model scores and
    stores only the top one and the rule's contrast, as one pair (top first); their
    `generation_params["best_of"]` hold the K scores and which candidate each one was.
    """

    session: Session
    project: Project
    policy: ModelVersion
    previous: ModelVersion | None
    run_id: int
    settings: ProjectSettings
    params: dict[str, Any]
    best_of: BestOf | None = None
    responses: int = 0
    pairs: int = 0
    eval_pairs: int = 0
    truncated: int = 0
    skipped: int = 0
    score_gaps: list[float] = field(default_factory=list)
    top_scores: list[float] = field(default_factory=list)
    backfill: list[tuple[PromptTodo, int]] = field(default_factory=list)

    def save(self, todo: PromptTodo, generated: Sequence[Answer]) -> bool:
        """Add `todo`'s answers and pairs; False (nothing added) when another run answered the
        prompt meanwhile."""
        existing = self._lock_and_recount(todo)
        if existing is None:
            return False
        new_ids = self._add(todo, generated, [{} for _ in generated])
        for a, b in [*itertools.product(existing, new_ids), *itertools.combinations(new_ids, 2)]:
            self._pair(todo.prompt_id, a, b, "standard")
        if self.previous is not None and self._wants_eval(todo.prompt_id):
            self._eval_pair(todo, new_ids[0])
        return True

    def save_best_of(
        self, todo: PromptTodo, candidates: Sequence[Answer], scores: Sequence[float]
    ) -> bool:
        """Keep the reward model's top answer of `candidates` and the rule's contrast as one
        pair (`todo.needed` of them: only the top when the prompt already has an answer, which
        it is then paired with); False when another run answered the prompt meanwhile.

        A version-eval pair takes the first candidate, whatever its score, so that it compares
        plain samples of the two policies: the reward model's pick would favour the new one.
        """
        assert self.best_of is not None
        best = self.best_of
        if len(candidates) != len(scores) or len(candidates) < 2:
            raise ValueError(f"{len(candidates)} candidates with {len(scores)} scores")
        existing = self._lock_and_recount(todo)
        if existing is None:
            return False
        rng = random.Random(f"{best.seed}:{todo.prompt_id}")
        top, contrast = choose_pair(scores, best.rule, rng)
        keep = [(top, "top"), (contrast, "contrast")][: todo.needed]
        wants_eval = self.previous is not None and self._wants_eval(todo.prompt_id)
        if wants_eval and all(index != 0 for index, _ in keep):
            keep.append((0, "sample"))
        notes = [
            {
                "best_of": {
                    "k": len(candidates),
                    "rule": best.rule,
                    "reward_model_id": best.reward_model_id,
                    "role": role,
                    "candidate": index,
                    "score": float(scores[index]),
                    "scores": [round(float(s), 6) for s in scores],
                }
            }
            for index, role in keep
        ]
        new_ids = self._add(todo, [candidates[index] for index, _ in keep], notes)
        top_id = new_ids[0]
        for other in existing:
            self._pair(todo.prompt_id, other, top_id, "standard")
        if todo.needed >= 2:
            self._pair(todo.prompt_id, top_id, new_ids[1], "standard")
            self.score_gaps.append(float(scores[top]) - float(scores[contrast]))
        self.top_scores.append(float(scores[top]))
        if wants_eval:
            sample = next(i for i, (index, _) in zip(new_ids, keep, strict=True) if index == 0)
            self._eval_pair(todo, sample)
        return True

    def _lock_and_recount(self, todo: PromptTodo) -> list[int] | None:
        """The prompt's answers from this policy, under a row lock; None when they are no
        longer the ones the run planned for (another run answered it meanwhile)."""
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
            self.skipped += 1
            return None
        return existing

    def _add(
        self, todo: PromptTodo, answers: Sequence[Answer], notes: Sequence[dict[str, Any]]
    ) -> list[int]:
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
                    **note,
                },
            )
            for g, note in zip(answers, notes, strict=True)
        ]
        self.session.add_all(rows)
        self.session.flush()
        self.responses += len(rows)
        self.truncated += sum(1 for g in answers if g.truncated)
        return [r.id for r in rows]

    def _eval_pair(self, todo: PromptTodo, ours: int) -> None:
        """Pair `ours` with the previous policy's plain answer, or ask for one (backfill)."""
        assert self.previous is not None
        theirs = [
            (rid, params)
            for rid, params in self.session.execute(
                select(Response.id, Response.generation_params)
                .where(
                    Response.prompt_id == todo.prompt_id,
                    Response.model_version_id == self.previous.id,
                )
                .order_by(Response.id.desc())
            )
            if _plain_sample(params)
        ]
        if theirs:
            self._pair(todo.prompt_id, ours, theirs[0][0], "version_eval")
        else:
            self.backfill.append((todo, ours))

    def save_previous(self, todo: PromptTodo, ours: int, generated: Answer) -> None:
        """Add the previous policy's answer to `todo` and its version-eval pair with `ours`."""
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
        """What the run stored; with best-of-K also K, the rule, the reward model and the mean
        score of the kept top answers and of their gap to the contrast."""
        result: dict[str, Any] = {
            "responses": self.responses,
            "pairs": self.pairs,
            "version_eval_pairs": self.eval_pairs,
            "truncated": self.truncated,
            "skipped_prompts": self.skipped,
        }
        if self.best_of is not None:
            result.update(
                best_of_k=self.best_of.k,
                pair_selection=self.best_of.rule,
                reward_model_id=self.best_of.reward_model_id,
                mean_top_score=_mean(self.top_scores),
                mean_score_gap=_mean(self.score_gaps),
            )
        return result


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _plain_sample(params: dict[str, Any] | None) -> bool:
    """Whether a stored answer is a plain draw from its policy: not picked by a reward model
    (a best-of-K answer counts only as its run's first candidate, which is kept whatever its
    score)."""
    best_of = (params or {}).get("best_of")
    return not isinstance(best_of, dict) or best_of.get("candidate") == 0
