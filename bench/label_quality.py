"""Label quality: what each way of turning judgments into training labels (a snapshot's
`aggregate`: separate, majority, reliability) does when some raters are careless or cheat.

    .venv/bin/python bench/label_quality.py              # labels + the two fast reward models
    .venv/bin/python bench/label_quality.py --trainer    # Verdict's reward trainer (slow)
    .venv/bin/python bench/label_quality.py --quick      # smoke test of both (docs unchanged)

Each part saves its figures under var/bench/label_quality/ and rewrites the "Label quality"
section of docs/benchmarks.md from every part run so far.

Data: the HH-RLHF harmless-base test split (2,312 pairs), read in place from ../shared and parsed
by Verdict's importer (`app.services.imports.parse_preferences`); the dataset's own choice is the
truth. Each pair's two responses are stored as a and b in a random order.

Raters (simulated): a pool of nine — four careful (wrong 5 % of the time), three noisy (35 %),
one spammer who always picks the side shown on the LEFT (the side shown left is drawn per
judgment, as Verdict's queue does), and one who answers at random. Every pair is judged by 3
distinct raters drawn uniformly from the pool; each judgment is "better" (strength 1, so every
margin is 0 and only the labels differ). Simulation seeds 0-4.

The judgments become Verdict rows and go through `app.services.snapshots.to_examples` under
`SnapshotConfig(aggregate=...)`: exactly what a reward run would train on.

Figures per aggregation:
* **label accuracy**: the mean, over the training examples, of the probability each example's
  label puts on the true preference (a hard label counts 1 or 0; a soft label l whose chosen side
  is the true one counts l, otherwise 1 − l);
* **right side**: the share of examples whose chosen side is the true one, whatever the label;
* **held-out accuracy** of a reward model trained on the examples of the training prompts, on
  pairs of prompts it never saw, against the true labels. Reward models, each a linear reward
  r = w·φ(response) trained with Verdict's Bradley–Terry loss (`app.ml.reward.preference_loss`,
  soft labels as given), L2 chosen once per model on an inner split of the training pairs:
  - *bag-of-words head* (every pair, every seed): φ = log(1 + counts) of the response's hashed
    word unigrams and bigrams;
  - *frozen SmolLM2 head* (the first 900 pairs, every seed): φ = SmolLM2-135M-Instruct's final
    hidden state at the response's last token (Verdict's packed forward, max length 128),
    standardised; computed once and cached;
  - *Verdict's trainer* (`--trainer`, seed 0): `train_reward_model` in `last_n` mode (the top
    decoder layer, norm and head train) on a subset, scored by `evaluate_reward_model`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
WORK = ROOT / "var" / "bench" / "label_quality"
SECTION = "## Label quality"
AGGREGATES = ("separate", "majority", "reliability")
SEEDS = (0, 1, 2, 3, 4)
_WORD = re.compile(r"[a-z']+")
RATERS_PER_PAIR = 3
# (kind, P(wrong)); the left-clicker and the random rater ignore the truth.
POOL: tuple[tuple[str, float], ...] = (
    *[("careful", 0.05)] * 4,
    *[("noisy", 0.35)] * 3,
    ("always left", 0.5),
    ("random", 0.5),
)


@dataclass(frozen=True)
class Budget:
    """How much of the split each reward model sees (the label figures use every pair)."""

    heldout_fraction: float = 0.3  # by prompt (`split_by_prompt`, seed 0)
    feature_pairs: int = 900  # the frozen SmolLM2 head: the first N pairs by index
    max_length: int = 128
    bow_dims: int = 1 << 14
    head_steps: int = 300
    head_lr: float = 0.05
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    trainer_pairs: int = 120  # `--trainer`: this many training pairs of the SmolLM2 subset
    trainer_heldout: int = 150  # and this many of its held-out pairs
    trainer_layers: int = 1
    trainer_lr: float = 1e-4


# --- data and simulated judgments ----------------------------------------------------------------


def load_records(path: Path) -> list[Any]:
    """The split as Verdict's importer reads it (records with prompt, chosen, rejected)."""
    from app.services.imports import parse_preferences

    records, _skipped = parse_preferences(path.read_bytes(), "hh-rlhf", 10**6, 10**9)
    return records


def simulate(records: Sequence[Any], seed: int) -> list[Any]:
    """Verdict rows (`snapshots._Row`) of simulated judgments of every pair."""
    from app.models import ComparisonPair, Judgment, Prompt, Response
    from app.services.snapshots import _Row

    rng = random.Random(seed)
    rows = []
    judgment_id = 0
    for i, record in enumerate(records):
        chosen_is_a = rng.random() < 0.5
        a_text, b_text = (
            (record.chosen, record.rejected) if chosen_is_a else (record.rejected, record.chosen)
        )
        prompt = Prompt(id=i, messages=record.prompt, text="")
        a = Response(id=2 * i, prompt_id=i, text=a_text)
        b = Response(id=2 * i + 1, prompt_id=i, text=b_text)
        pair = ComparisonPair(id=i, prompt_id=i, response_a_id=a.id, response_b_id=b.id)
        truth = "a" if chosen_is_a else "b"
        for rater in rng.sample(range(len(POOL)), RATERS_PER_PAIR):
            kind, wrong = POOL[rater]
            shown_left = rng.choice("ab")
            if kind == "always left":
                choice = shown_left
            elif kind == "random":
                choice = rng.choice("ab")
            else:
                choice = truth if rng.random() >= wrong else ("b" if truth == "a" else "a")
            judgment_id += 1
            judgment = Judgment(
                id=judgment_id, pair_id=i, rater_id=rater + 1, source="rater", choice=choice,
                strength=1, flags=[], shown_left=shown_left,
            )  # fmt: skip
            rows.append(_Row(judgment, pair, prompt, a, b))
    return rows


def label_figures(examples: Sequence[Any], records: Sequence[Any]) -> dict[str, float]:
    """Label accuracy (soft labels weighted) and the share of examples on the right side."""
    weighted = right = 0.0
    for e in examples:
        i = int(e.pair.split(":")[1])
        is_right = e.chosen == records[i].chosen
        right += is_right
        weighted += e.label if is_right else 1.0 - e.label
    n = len(examples)
    return {"examples": n, "label_accuracy": weighted / n, "right_side": right / n}


def rater_estimates(rows: Sequence[Any]) -> dict[str, float]:
    """The reliability model's mean estimated accuracy per kind of rater."""
    from app.services.snapshots import reliability_estimate

    est = reliability_estimate(rows)
    by_kind: dict[str, list[float]] = {}
    for rater, q in est.accuracy.items():
        by_kind.setdefault(POOL[rater - 1][0], []).append(q)
    return {kind: statistics.mean(qs) for kind, qs in by_kind.items()}


# --- reward models: linear heads on fixed features --------------------------------------------


def bow_features(records: Sequence[Any], dims: int) -> Any:
    """[N, 2, dims]: log(1 + counts) of the hashed word unigrams and bigrams of each pair's true
    chosen (0) and rejected (1) response."""
    import torch

    def phi(text: str) -> Any:
        v = torch.zeros(dims)
        words = _WORD.findall(text.lower())
        for gram in [*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))]:
            v[zlib.crc32(gram.encode()) % dims] += 1.0
        return torch.log1p(v)

    return torch.stack([torch.stack([phi(r.chosen), phi(r.rejected)]) for r in records])


def smollm2_features(backbone: str, records: Sequence[Any], max_length: int) -> Any:
    """[N, 2, H]: SmolLM2's final hidden state at the last token of the true chosen (0) and
    rejected (1) response of each pair, by Verdict's packed forward (shared prefix once)."""
    import torch

    from app.kinds.data import PreferenceExample
    from app.ml.reward import (
        RewardConfig,
        _batches_by_length,
        _decoder,
        build_reward_model,
        encode_pair,
        load_tokenizer,
        pack_pairs,
    )

    tokenizer = load_tokenizer(backbone)
    encoded = [
        encode_pair(tokenizer, PreferenceExample(r.prompt, r.chosen, r.rejected), max_length)
        for r in records
    ]
    model, _ = build_reward_model(RewardConfig(backbone=backbone), tokenizer)
    decoder = _decoder(model)
    out = torch.zeros(len(records), 2, model.config.hidden_size)
    done = 0
    with torch.no_grad():
        for batch in _batches_by_length(encoded, 8):
            rows = pack_pairs([encoded[i] for i in batch], int(tokenizer.pad_token_id))
            hidden = decoder(
                input_ids=rows.input_ids,
                attention_mask=rows.attention_mask,
                position_ids=rows.position_ids,
                use_cache=False,
            ).last_hidden_state
            out[torch.tensor(batch)] = hidden[torch.arange(len(batch))[:, None], rows.ends]
            done += len(batch)
            print(f"features {done}/{len(records)}", file=sys.stderr, flush=True)
    return out


@dataclass
class Head:
    """A linear reward r = w·φ over fixed per-pair features (`[N, 2, H]`, true side first)."""

    features: Any
    standardise: bool
    l2: float = 0.0

    def accuracy(
        self,
        examples: Sequence[Any],
        records: Sequence[Any],
        heldout: Sequence[int],
        budget: Budget,
    ) -> float:
        """Train on the examples (Verdict's Bradley–Terry loss, labels and margins as given);
        the share of held-out pairs whose true chosen response gets the higher reward."""
        import torch

        from app.ml.reward import preference_loss

        index = torch.tensor([int(e.pair.split(":")[1]) for e in examples])
        flip = torch.tensor(
            [e.chosen != records[int(i)].chosen for e, i in zip(examples, index, strict=True)]
        )
        x = self.features[index]
        chosen = torch.where(flip[:, None], x[:, 1], x[:, 0])
        rejected = torch.where(flip[:, None], x[:, 0], x[:, 1])
        label = torch.tensor([e.label for e in examples])
        margin = torch.tensor([e.margin for e in examples])
        mean, std = torch.zeros(x.shape[-1]), torch.ones(x.shape[-1])
        if self.standardise:
            pool = torch.cat([chosen, rejected])
            mean, std = pool.mean(0), pool.std(0) + 1e-6
        chosen, rejected = (chosen - mean) / std, (rejected - mean) / std

        w = torch.zeros(x.shape[-1], requires_grad=True)
        optimizer = torch.optim.Adam([w], lr=budget.head_lr)
        for _ in range(budget.head_steps):
            optimizer.zero_grad()
            loss = preference_loss(chosen @ w, rejected @ w, margin, label).mean()
            (loss + self.l2 * (w * w).sum()).backward()
            optimizer.step()
        held = self.features[torch.tensor(list(heldout))]
        diff = ((held[:, 0] - mean) / std - (held[:, 1] - mean) / std) @ w.detach()
        return float((diff > 0).float().mean())

    def choose_l2(self, records: Sequence[Any], train: Sequence[int], budget: Budget) -> None:
        """The grid's best L2 on an inner split (first 75 % / last 25 % of the training pairs),
        trained on the true labels; chosen once, then the same for every aggregation."""
        cut = int(0.75 * len(train))
        inner = _truth_examples(records, train[:cut])
        scores = {}
        for l2 in budget.l2_grid:
            self.l2 = l2
            scores[l2] = self.accuracy(inner, records, train[cut:], budget)
        self.l2 = max(scores, key=lambda k: scores[k])


# --- Verdict's trainer ---------------------------------------------------------------------------


def trainer_accuracy(
    backbone: str,
    train_examples: Sequence[Any],
    heldout_examples: Sequence[Any],
    name: str,
    budget: Budget,
) -> dict[str, float]:
    """Verdict's reward trainer on these examples, scored on the held-out ones."""
    from app.ml.reward import RewardConfig, evaluate_reward_model, train_reward_model

    config = RewardConfig(
        backbone=backbone,
        max_length=budget.max_length,
        train_mode="last_n",
        last_n_layers=budget.trainer_layers,
        learning_rate=budget.trainer_lr,
        batch_size=8,
        epochs=1,
        seed=0,
    )
    out = WORK / f"trainer-{name}"
    started = time.perf_counter()
    result = train_reward_model(config, list(train_examples), [], out)
    metrics = evaluate_reward_model(out, list(heldout_examples), max_length=budget.max_length)
    shutil.rmtree(out)  # 0.5 GB a model; the figures are all this bench keeps
    return {
        "examples": len(train_examples),
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "heldout_accuracy": metrics["accuracy"],
    }


# --- the bench -----------------------------------------------------------------------------------


def split(records: Sequence[Any], budget: Budget) -> tuple[list[int], list[int]]:
    """Training and held-out pair indices, by prompt (Verdict's `split_by_prompt`)."""
    from app.kinds.data import PreferenceExample
    from app.ml.preferences import split_by_prompt

    examples = [
        PreferenceExample(r.prompt, r.chosen, r.rejected, pair=f"pair:{i}")
        for i, r in enumerate(records)
    ]
    train, held = split_by_prompt(examples, budget.heldout_fraction, seed=0)
    return [int(e.pair[5:]) for e in train], [int(e.pair[5:]) for e in held]


def run_heads(
    records: Sequence[Any], budget: Budget, seeds: Sequence[int], backbone: str
) -> dict[str, Any]:
    """Label figures on every pair, and both linear heads, for each seed and aggregation."""
    import torch

    from app.kinds.data import SnapshotConfig
    from app.services.snapshots import to_examples

    started = time.perf_counter()
    train_ids, heldout_ids = split(records, budget)
    bow = Head(bow_features(records, budget.bow_dims), standardise=False)
    bow.choose_l2(records, train_ids, budget)

    subset = records[: budget.feature_pairs]
    sub_train, sub_heldout = split(subset, budget)
    cache = WORK / f"features-{len(subset)}-{budget.max_length}.pt"
    if cache.exists():
        features = torch.load(cache)
    else:
        features = smollm2_features(backbone, subset, budget.max_length)
        torch.save(features, cache)
    smol = Head(features, standardise=True)
    smol.choose_l2(subset, sub_train, budget)

    results: dict[str, Any] = {"labels": {}, "bow": {}, "smollm2": {}, "raters": []}
    train_set, sub_train_set = set(train_ids), set(sub_train)
    for seed in seeds:
        rows = simulate(records, seed)
        results["raters"].append(rater_estimates(rows))
        for aggregate in AGGREGATES:
            config = SnapshotConfig(aggregate=aggregate)  # type: ignore[arg-type]
            examples = to_examples(rows, config)
            results["labels"].setdefault(aggregate, []).append(label_figures(examples, records))
            train_examples = [e for e in examples if int(e.pair[5:]) in train_set]
            results["bow"].setdefault(aggregate, []).append(
                bow.accuracy(train_examples, records, heldout_ids, budget)
            )
            sub_examples = [e for e in examples if int(e.pair[5:]) in sub_train_set]
            results["smollm2"].setdefault(aggregate, []).append(
                smol.accuracy(sub_examples, subset, sub_heldout, budget)
            )
            print(
                f"seed {seed} {aggregate}: bow {results['bow'][aggregate][-1]:.3f}"
                f" smollm2 {results['smollm2'][aggregate][-1]:.3f}",
                file=sys.stderr,
                flush=True,
            )
    results["truth"] = {
        "bow": bow.accuracy(_truth_examples(records, train_ids), records, heldout_ids, budget),
        "smollm2": smol.accuracy(_truth_examples(subset, sub_train), subset, sub_heldout, budget),
    }
    results["l2"] = {"bow": bow.l2, "smollm2": smol.l2}
    results["split"] = {"train": len(train_ids), "heldout": len(heldout_ids)}
    results["feature_split"] = {"train": len(sub_train), "heldout": len(sub_heldout)}
    results["records"] = len(records)
    results["seconds"] = time.perf_counter() - started
    return results


def run_trainer(records: Sequence[Any], budget: Budget, backbone: str) -> dict[str, Any]:
    """Verdict's trainer on each aggregation's examples of seed 0, a subset of the pairs."""
    from app.kinds.data import SnapshotConfig
    from app.services.snapshots import to_examples

    started = time.perf_counter()
    subset = records[: budget.feature_pairs]
    sub_train, sub_heldout = split(subset, budget)
    train_set = set(sub_train[: budget.trainer_pairs])
    heldout_examples = _truth_examples(subset, sub_heldout[: budget.trainer_heldout])
    rows = simulate(records, 0)
    results: dict[str, Any] = {"models": {}}
    for aggregate in AGGREGATES:
        config = SnapshotConfig(aggregate=aggregate)  # type: ignore[arg-type]
        examples = [e for e in to_examples(rows, config) if int(e.pair[5:]) in train_set]
        results["models"][aggregate] = trainer_accuracy(
            backbone, examples, heldout_examples, aggregate, budget
        )
        print(f"trainer {aggregate}: {results['models'][aggregate]}", file=sys.stderr, flush=True)
    results["pairs"] = len(train_set)
    results["heldout"] = len(heldout_examples)
    results["seconds"] = time.perf_counter() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 pairs, one seed, no docs")
    parser.add_argument("--trainer", action="store_true", help="Verdict's reward trainer part")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--trainer-pairs", type=int, default=Budget.trainer_pairs)
    parser.add_argument("--trainer-heldout", type=int, default=Budget.trainer_heldout)
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the docs from the saved figures"
    )
    args = parser.parse_args()
    if args.report:
        write_report(Budget())
        return

    import torch

    from app.ml.loading import resolve_model_dir

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    budget = Budget(trainer_pairs=args.trainer_pairs, trainer_heldout=args.trainer_heldout)
    records = load_records(args.data)
    if args.quick:
        budget = Budget(feature_pairs=60, trainer_pairs=16, trainer_heldout=16, head_steps=50)
        records = records[:200]
    backbone = str(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    global WORK
    if args.quick:
        WORK = WORK / "quick"
    WORK.mkdir(parents=True, exist_ok=True)
    if args.trainer:
        name, results = "trainer", run_trainer(records, budget, backbone)
    else:
        name, results = (
            "heads",
            run_heads(records, budget, SEEDS[:1] if args.quick else SEEDS, backbone),
        )
    print(json.dumps(results, indent=2))
    if args.quick:
        print("(--quick: docs/benchmarks.md left unchanged)", file=sys.stderr)
        return
    (WORK / f"results-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(budget)


def write_report(budget: Budget) -> None:
    """Rewrite the docs section from every part's saved figures (the heads' are required)."""
    saved = {
        part: json.loads((WORK / f"results-{part}.json").read_text())
        for part in ("heads", "trainer")
        if (WORK / f"results-{part}.json").exists()
    }
    if "heads" not in saved:
        raise SystemExit("no saved figures: run bench/label_quality.py first")
    write_section(SECTION, report(budget, saved["heads"], saved.get("trainer")))


def _truth_examples(records: Sequence[Any], ids: Sequence[int]) -> list[Any]:
    from app.kinds.data import PreferenceExample

    return [
        PreferenceExample(
            records[i].prompt, records[i].chosen, records[i].rejected, pair=f"pair:{i}"
        )
        for i in ids
    ]


def _paired(accuracy: dict[str, list[float]], aggregate: str) -> list[float]:
    return [x - y for x, y in zip(accuracy[aggregate], accuracy["separate"], strict=True)]


def _spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(budget: Budget, heads: dict[str, Any], trainer: dict[str, Any] | None) -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    n_seeds = len(heads["labels"]["separate"])
    lines = [
        "| aggregation | training examples (all pairs) | label accuracy | right side"
        " | held-out acc, bag-of-words head | held-out acc, frozen SmolLM2 head |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for aggregate in AGGREGATES:
        figures = heads["labels"][aggregate]
        lines.append(
            f"| {aggregate} | {statistics.mean(f['examples'] for f in figures):.0f} | "
            f"{_spread([f['label_accuracy'] for f in figures])} | "
            f"{_spread([f['right_side'] for f in figures])} | "
            f"{_spread(heads['bow'][aggregate])} | {_spread(heads['smollm2'][aggregate])} |"
        )
    lines.append(
        f"| (the true labels, one example per pair) | {heads['records']} | 1 | 1 | "
        f"{heads['truth']['bow']:.3f} | {heads['truth']['smollm2']:.3f} |"
    )
    gains = "; ".join(
        f"{label}: reliability − separate {_spread(_paired(heads[key], 'reliability'))},"
        f" majority − separate {_spread(_paired(heads[key], 'majority'))}"
        for key, label in (("bow", "bag-of-words head"), ("smollm2", "frozen SmolLM2 head"))
    )

    def right(aggregate: str) -> str:
        return f"{statistics.mean(f['right_side'] for f in heads['labels'][aggregate]):.1%}"

    kinds = sorted({k for seed in heads["raters"] for k in seed})
    nominal = {kind: 1 - wrong for kind, wrong in POOL}
    estimates = "; ".join(
        f"{kind} {statistics.mean(s[kind] for s in heads['raters']):.3f} (true {nominal[kind]:.2f})"
        for kind in kinds
    )
    split, fsplit = heads["split"], heads["feature_split"]
    trainer_text = "Verdict's own trainer: not run yet (`--trainer`).\n"
    if trainer is not None:
        rows = [
            "| aggregation | training examples | train s | held-out acc, Verdict's trainer |",
            "|---|---:|---:|---:|",
        ]
        half = 1.96 * math.sqrt(0.25 / trainer["heldout"])
        for aggregate, t in trainer["models"].items():
            rows.append(
                f"| {aggregate} | {t['examples']} | {t['train_seconds']:.0f} |"
                f" {t['heldout_accuracy']:.3f} |"
            )
        command = (
            f".venv/bin/python bench/label_quality.py --trainer --trainer-pairs"
            f" {trainer['pairs']} --trainer-heldout {trainer['heldout']}"
        )
        trainer_text = (
            f"Verdict's own trainer (`{command}`,"
            f" {trainer['seconds'] / 60:.0f} min): `train_reward_model` in `last_n` mode (the top"
            f" {budget.trainer_layers} decoder layer, norm and head train), lr"
            f" {budget.trainer_lr}, batch 8, one epoch, max length {budget.max_length}, on the"
            f" examples of simulation seed 0 for the first {trainer['pairs']} training pairs of"
            f" the SmolLM2 subset, scored by `evaluate_reward_model` on {trainer['heldout']} of"
            f" its held-out pairs:\n\n" + "\n".join(rows) + "\n\n"
            f"On {trainer['heldout']} held-out pairs a 95 % interval is about ±{half:.3f} around"
            " an accuracy near 0.5"
            + (
                ", and every model here is inside it: trained this briefly on this CPU, the"
                " reward model has learnt next to nothing, so these rows cannot tell the"
                " aggregations apart; the linear heads above can, because they train in seconds"
                " on features computed once.\n"
                if all(abs(t["heldout_accuracy"] - 0.5) < half for t in trainer["models"].values())
                else ".\n"
            )
        )
    return f"""{SECTION}

Command: `.venv/bin/python bench/label_quality.py` ({heads["seconds"] / 60:.0f} min with the
SmolLM2 features already cached in `var/bench/label_quality/`; computing them took about 15 min)
on {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, transformers
{transformers.__version__}. Smoke test: `--quick`.

Data: HH-RLHF harmless-base test, {heads["records"]} pairs as Verdict's importer parses them; the
dataset's choice is the truth; each pair stores its two responses as a/b in random order.
Raters: a pool of nine — four careful (5 % wrong), three noisy (35 % wrong), one who always picks
the side shown left (drawn at random per judgment), one who answers at random — every pair
judged by {RATERS_PER_PAIR} of them drawn at random, every judgment "better" (margin 0).
{n_seeds} simulation seeds (0-{n_seeds - 1}): figures are mean ± standard deviation over them.
The judgments go through `snapshots.to_examples` under `SnapshotConfig(aggregate=...)`, as a
reward run's would.

* *label accuracy*: over the training examples, the mean probability the label puts on the true
  preference (a label l whose chosen side is the true one counts l, otherwise 1 − l; hard labels
  count 1 or 0).
* *right side*: the share of examples whose chosen response is the true one.
* *held-out accuracy*: a linear reward r = w·φ(response) trained on the aggregation's examples of
  the training prompts with Verdict's `preference_loss` (soft labels as given; Adam lr
  {budget.head_lr}, {budget.head_steps} full-batch steps, L2 picked from {list(budget.l2_grid)}
  on an inner split of the training pairs with the true labels, then fixed: bag-of-words
  {heads["l2"]["bow"]}, SmolLM2 {heads["l2"]["smollm2"]}), scored against the true labels on
  pairs of prompts it never saw (`split_by_prompt`, fraction {budget.heldout_fraction}, seed 0).
  *Bag-of-words head*: φ = log(1 + counts) of the response's hashed word unigrams and bigrams
  ({budget.bow_dims} buckets); all pairs, {split["train"]} training and {split["heldout"]}
  held out. *Frozen SmolLM2 head*: φ = SmolLM2-135M-Instruct's final hidden state at the
  response's last token (Verdict's packed forward, max length {budget.max_length}),
  standardised; the first {budget.feature_pairs} pairs only (the forward pass is the cost),
  {fsplit["train"]} training and {fsplit["heldout"]} held out.

{chr(10).join(lines)}

Held-out accuracy gained over `separate`, paired by seed (same held-out pairs): {gains}.

Reading: `reliability` puts the most examples on the right side ({right("reliability")}, against
{right("majority")} for `majority` and {right("separate")} for `separate`): the model finds the
spammer and the random rater worthless and the careful raters trustworthy, where a majority
counts every vote alike and `separate` trains on the spammer's clicks as on anyone's. Its label
accuracy is lower than its right-side share because a soft label keeps the doubt that remains.
Downstream, these reward models are weak — trained on the true labels they reach
{heads["truth"]["bow"]:.3f} and {heads["truth"]["smollm2"]:.3f} — and turn the label gains into
about {100 * statistics.mean(_paired(heads["bow"], "reliability")):.0f} and
{100 * statistics.mean(_paired(heads["smollm2"], "reliability")):.0f} points of held-out
accuracy over `separate`.

The reliability model's estimated accuracy by kind of rater (mean over raters and seeds):
{estimates}. The left-side spammer comes out at chance, like the random rater: with sides drawn
at random their votes carry no information about which response is better (the Quality page's
position-bias figure is what tells the two apart).

{trainer_text}"""


if __name__ == "__main__":
    main()
