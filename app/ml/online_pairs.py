"""On-policy DPO pairs: the policy's own fresh answers, ranked by a reward model.

    prompts ─► K answers each (app.ml.generation) ─► reward of each (app.ml.reward)
            ─► EOS penalty ─► one pair per prompt (app.kinds.pairs.choose_pair)
            ─► drop pairs the reward model cannot tell apart ─► PreferencePair list

This is the data half of iterative ("online", "self-rewarding") DPO: instead of human-judged
pairs of answers some earlier policy wrote, DPO trains on pairs of answers the current policy
writes now, labelled by the reward model that stands in for the raters. The pairs are then on the
policy's own distribution, where DPO's implicit KL to the reference is measured, and every round
of the loop can draw fresh ones.

Choices worth knowing:

* **Ranking score.** An answer's score is its reward minus `missing_eos_penalty` when it was cut
  at `max_new_tokens` without EOS, the convention PPO uses (`app.kinds.ppo`): DPO appends EOS to
  every completion it trains on (`app.ml.dpo.tokenize_pairs`), so a truncated answer taken as the
  chosen side would teach the policy to stop mid-sentence. The margin of a pair is the difference
  of these scores; both raw rewards are kept on the pair as well.
* **Margin filter.** A pair whose margin is below `min_score_margin` is dropped, and so is a pair
  of two identical texts (its DPO gradient is exactly zero): where the reward model cannot tell
  two answers apart, its label is a coin flip and DPO would learn noise.
* **Labels.** A kept pair has label 1.0: the reward model's ranking is taken as a hard
  preference, as the raters' would be. The margin filter, not a soft label, is what keeps the
  doubtful ones out (a soft label sigmoid(margin) near 0.5 would train almost nothing anyway).
* **Determinism.** Answers come from `generate_responses`, whose every (prompt, sample) row has a
  generator seeded from (`sampling_seed`, prompt index, sample index); the `top_random` rule
  draws from a generator seeded per prompt. The same prompts, policy, reward model and seed give
  the same pairs, whatever the batch size. The pairs also round-trip through JSON (`save_pairs`,
  `load_pairs`), so a resumed run trains on exactly the pairs its first attempt drew.
* Sampling is plain temperature sampling without top-p: the answers are the policy's own
  distribution (as PPO samples), not a trimmed one.

The caller chooses the prompts: the DPO job passes training prompts only, never held-out ones.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.kinds.dpo import OnlinePairKnobs
from app.kinds.generate import SamplingConfig
from app.kinds.pairs import choose_pair
from app.ml.dpo import PreferencePair
from app.ml.generation import GeneratedResponse, generate_responses, row_seed
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import LoadedModel
from app.ml.policy import Messages, as_messages
from app.ml.reward import LoadedRewardModel, score_responses

# A reward given as a function: (prompt messages, answer texts) -> one reward per answer.
AnswerScorer = Callable[[Messages, list[str]], Sequence[float]]
PAIRS_FORMAT = 1


@dataclass(frozen=True)
class PolicyPair:
    """One pair of the policy's answers to one prompt, as the reward model ranked them.

    `chosen_reward`/`rejected_reward` are the reward model's raw scores; `margin` is the
    difference of the ranking scores, which include the EOS penalty of a truncated answer.
    `prompt_index` is the prompt's position in the list `policy_pairs` was given.
    """

    prompt_index: int
    prompt: Messages
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    margin: float
    chosen_truncated: bool
    rejected_truncated: bool

    def preference(self) -> PreferencePair:
        """The pair as DPO's plain data: the reward model's ranking as a hard label."""
        return PreferencePair(self.prompt, self.chosen, self.rejected, 1.0)


@dataclass
class PolicyPairs:
    """The kept pairs of a `policy_pairs` call and what happened to the rest."""

    pairs: list[PolicyPair]
    prompts: int
    answers: int
    truncated: int
    dropped_low_margin: int
    dropped_identical: int

    def stats(self) -> dict[str, float]:
        """Counts and the mean margin of the kept pairs, for a run's result and metrics."""
        margins = [p.margin for p in self.pairs]
        return {
            "prompts": float(self.prompts),
            "answers": float(self.answers),
            "truncated": float(self.truncated),
            "pairs": float(len(self.pairs)),
            "dropped_low_margin": float(self.dropped_low_margin),
            "dropped_identical": float(self.dropped_identical),
            "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        }


def ranking_scores(
    rewards: Sequence[float], truncated: Sequence[bool], missing_eos_penalty: float | None
) -> list[float]:
    """Each answer's reward, less `missing_eos_penalty` where it has no EOS (None: as is)."""
    penalty = missing_eos_penalty or 0.0
    return [r - penalty if cut else r for r, cut in zip(rewards, truncated, strict=True)]


def pair_of(
    prompt_index: int,
    prompt: Messages,
    texts: Sequence[str],
    rewards: Sequence[float],
    truncated: Sequence[bool],
    config: OnlinePairKnobs,
) -> PolicyPair:
    """The pair `config.pair_selection` picks from one prompt's scored answers (unfiltered)."""
    scores = ranking_scores(rewards, truncated, config.missing_eos_penalty)
    # One generator per prompt: the pick for a prompt does not depend on the prompts before it.
    rng = random.Random(row_seed(config.sampling_seed, prompt_index, -1))
    top, other = choose_pair(scores, config.pair_selection, rng)
    return PolicyPair(
        prompt_index=prompt_index,
        prompt=prompt,
        chosen=texts[top],
        rejected=texts[other],
        chosen_reward=float(rewards[top]),
        rejected_reward=float(rewards[other]),
        margin=float(scores[top] - scores[other]),
        chosen_truncated=bool(truncated[top]),
        rejected_truncated=bool(truncated[other]),
    )


def _reward_function(reward: LoadedRewardModel | AnswerScorer) -> AnswerScorer:
    if isinstance(reward, LoadedRewardModel):
        # One packed row per prompt: its K answers share the encoded prompt.
        return lambda prompt, texts: score_responses(
            reward, prompt, texts, responses_per_row=max(len(texts), 1)
        )
    return reward


def policy_pairs(
    policy: LoadedModel | tuple[PreTrainedModel, PreTrainedTokenizerBase],
    reward: LoadedRewardModel | AnswerScorer,
    prompts: Sequence[Messages | str],
    config: OnlinePairKnobs,
    hooks: Hooks | None = None,
) -> PolicyPairs:
    """Sample `samples_per_prompt` answers per prompt from `policy`, score them with `reward`,
    and keep one pair per prompt whose margin is at least `min_score_margin`.

    `reward` is a loaded reward model or a function (prompt messages, texts) -> rewards.
    `hooks.progress` reports the sampling, then the scoring; `hooks.should_stop()` is checked
    during both and raises `Cancelled`. The result lists the kept pairs in prompt order.
    """
    hooks = hooks or NullHooks()
    messages = [as_messages(p) for p in prompts]
    sampling = SamplingConfig(
        num_responses=config.samples_per_prompt,
        temperature=config.temperature,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generation_batch_size,
        do_sample=True,
        seed=config.sampling_seed,
    )
    answers: list[list[GeneratedResponse]] = generate_responses(policy, messages, sampling, hooks)
    score = _reward_function(reward)

    pairs: list[PolicyPair] = []
    low_margin = identical = truncated = 0
    for index, (prompt, generated) in enumerate(zip(messages, answers, strict=True)):
        if hooks.should_stop():
            raise Cancelled(f"cancelled while scoring the policy's answers ({index} prompts)")
        texts = [g.text for g in generated]
        cut = [g.truncated for g in generated]
        truncated += sum(cut)
        rewards = [float(r) for r in score(prompt, texts)]
        if len(rewards) != len(texts):
            raise ValueError(f"the reward gave {len(rewards)} scores for {len(texts)} answers")
        pair = pair_of(index, prompt, texts, rewards, cut, config)
        if pair.chosen == pair.rejected:
            identical += 1
        elif pair.margin < config.min_score_margin:
            low_margin += 1
        else:
            pairs.append(pair)
        hooks.progress(index + 1, len(messages), "")
    hooks.progress(
        len(messages),
        len(messages),
        f"policy pairs: {len(pairs)} of {len(messages)} prompts kept ({low_margin} below the"
        f" margin {config.min_score_margin}, {identical} identical; {truncated} of"
        f" {len(messages) * config.samples_per_prompt} answers truncated)",
    )
    return PolicyPairs(
        pairs=pairs,
        prompts=len(messages),
        answers=len(messages) * config.samples_per_prompt,
        truncated=truncated,
        dropped_low_margin=low_margin,
        dropped_identical=identical,
    )


def save_pairs(path: Path, result: PolicyPairs, key: dict[str, Any]) -> None:
    """Write `result` as JSON to `path` atomically (temp file, then `os.replace`), with `key`:
    what the pairs were drawn from (config, prompt ids, model ids), checked by `load_pairs`."""
    body = {"format": PAIRS_FORMAT, "key": key, **asdict(result)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pairs(path: Path, key: dict[str, Any]) -> PolicyPairs | None:
    """The pairs `save_pairs` wrote to `path`, or None when there are none or they were drawn
    under another `key` (then the caller draws them again)."""
    if not path.exists():
        return None
    body = json.loads(path.read_text(encoding="utf-8"))
    if body.get("format") != PAIRS_FORMAT or body.get("key") != key:
        return None
    pairs = [PolicyPair(**p) for p in body.pop("pairs")]
    fields = {k: body[k] for k in PolicyPairs.__dataclass_fields__ if k != "pairs"}
    return PolicyPairs(pairs=pairs, **fields)
