"""How well does a reward model learn each closed-loop rule from the loop's first round, and
which reward-training settings learn it best?

    .venv/bin/python bench/rule_reward.py                          # every rule and setting; docs
    .venv/bin/python bench/rule_reward.py --rule impersonal --setting last4 --setting last8-ep4
    .venv/bin/python bench/rule_reward.py --quick                  # tiny model, smoke (no docs)

The closed-loop benchmark (`bench/closed_loop.py`) stops when its reward model, trained on the
first round's judgments, is not better than chance on its validation pairs — and those were 39
pairs, whose 95 % interval is ±0.15 wide. This bench asks the question on its own, with many more
validation pairs: the base policy answers `--prompts` prompts of the closed loop (the same
prompts, `--answers` answers each, at the loop's temperature and token limit; cached in
`var/bench/rule_reward/`), each rule judges every pair of answers to a prompt exactly as the
loop's simulated raters do (`RULES[...].judge`), the decided pairs are split by prompt
(`--val-fraction`), and each reward-training setting (`closed_loop.REWARD_SETTINGS`, the loop's
`--reward-setting` choices) trains on the same training pairs (`app.ml.reward.train_reward_model`,
the trainer a `reward` run uses) and is scored on the same validation pairs: accuracy with a
Wilson 95 % interval, and training seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import closed_loop  # noqa: E402
from closed_loop import REWARD_COMMON, REWARD_SETTINGS, RULES, load_prompts  # noqa: E402

from app.kinds.data import PreferenceExample  # noqa: E402

WORK = ROOT / "var" / "bench" / "rule_reward"
RESULTS = ROOT / "bench" / "results" / "rule_reward.json"
SECTION = "## Reward model on the closed-loop rules"

# The settings compared are the closed loop's `--reward-setting` choices; `val_fraction` is this
# bench's own split.
COMMON = {k: v for k, v in REWARD_COMMON.items() if k != "val_fraction"} | {"seed": 0}


def answers_for(prompts: list[str], backbone: str, answers: int, max_new_tokens: int) -> Any:
    """The base policy's answers to every prompt, as (text, truncated) per answer; cached."""
    key = hashlib.sha256(
        json.dumps([prompts, backbone, answers, max_new_tokens]).encode()
    ).hexdigest()[:16]
    cache = WORK / f"answers-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from app.kinds.generate import SamplingConfig
    from app.ml.generation import generate_responses
    from app.ml.loading import load_causal_lm

    # The loop's round-1 generation: the project's temperature (0.9) and token limit.
    sampling = SamplingConfig(
        num_responses=answers, temperature=0.9, max_new_tokens=max_new_tokens, batch_size=16,
        seed=0,
    )  # fmt: skip
    started = time.monotonic()
    model = load_causal_lm(backbone, ROOT / "var" / "artifacts", device="cpu")
    groups = generate_responses(model, prompts, sampling)
    result = {
        "seconds": time.monotonic() - started,
        "answers": [[[r.text, r.truncated] for r in group] for group in groups],
    }
    WORK.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def labelled_pairs(
    rule: Any, prompts: list[str], answers: list[list[list[Any]]]
) -> tuple[list[PreferenceExample], list[PreferenceExample], dict[str, int]]:
    """Every pair of answers to a prompt, judged by the rule: the decided ones as examples, and
    the ties as soft-labelled ones (p = 0.5, as a snapshot with `ties: soft` makes them)."""
    examples, ties = [], []
    verdicts = {"a": 0, "b": 0, "tie": 0, "both_bad": 0}
    for i, (question, group) in enumerate(zip(prompts, answers, strict=True)):
        for (a, a_cut), (b, b_cut) in itertools.combinations(group, 2):
            verdict = rule.judge(question, a, a_cut, b, b_cut)
            verdicts[verdict] += 1
            if verdict == "tie":
                ties.append(
                    PreferenceExample(
                        prompt=[{"role": "user", "content": question}],
                        chosen=a, rejected=b, label=0.5, group=f"prompt:{i}",
                    )
                )  # fmt: skip
            if verdict in ("a", "b"):
                chosen, rejected = (a, b) if verdict == "a" else (b, a)
                examples.append(
                    PreferenceExample(
                        prompt=[{"role": "user", "content": question}],
                        chosen=chosen, rejected=rejected, group=f"prompt:{i}",
                    )
                )  # fmt: skip
    return examples, ties, verdicts


def train_and_score(
    backbone: str, setting: dict[str, Any], train: list[PreferenceExample],
    val: list[PreferenceExample],
) -> dict[str, Any]:  # fmt: skip
    from app.kinds.reward import RewardConfig
    from app.ml.reward import train_reward_model

    knobs = {k: v for k, v in setting.items() if k != "data"}
    if setting.get("data", {}).get("ties") != "soft":
        train = [e for e in train if e.label != 0.5]
    config = RewardConfig(backbone=backbone, **{**COMMON, **knobs})
    with tempfile.TemporaryDirectory(prefix="verdict-rule-reward-") as out:
        started = time.monotonic()
        result = train_reward_model(config, train, val, Path(out) / "model")
        seconds = time.monotonic() - started
    # No evaluation before the end (`eval_every` 0): the accuracy is the final model's, not
    # one picked for being best on these validation pairs.
    return {
        "val_accuracy": result.best_val_accuracy, "val_interval": result.best_val_accuracy_ci95,
        "val_decided_pairs": result.best_val_accuracy_pairs, "seconds": result.train_seconds,
        "wall_seconds": seconds, "train_accuracy": result.final_metrics.get("accuracy/train"),
    }  # fmt: skip


CURVE = (0.25, 0.5, 1.0)  # the shares of the learning-curve table


def first_prompts(examples: list[PreferenceExample], fraction: float) -> list[PreferenceExample]:
    """The examples of the first `fraction` of their prompts, in a seeded order of prompts."""
    if fraction >= 1.0:
        return examples
    groups = sorted({e.group_key for e in examples})
    random.Random(0).shuffle(groups)
    kept = set(groups[: max(1, round(fraction * len(groups)))])
    return [e for e in examples if e.group_key in kept]


def row_key(row: dict[str, Any]) -> tuple[str, str, float]:
    return row["rule"], row["setting"], row["train_fraction"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rule", action="append", choices=sorted(RULES))
    parser.add_argument("--setting", action="append", choices=list(REWARD_SETTINGS))
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.4)
    parser.add_argument(
        "--train-fraction", type=float, action="append",
        help="train on this share of the training prompts too (a learning curve; default 1)",
    )  # fmt: skip
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--section", action="store_true", help="only rewrite the docs section")
    args = parser.parse_args()
    if args.section:
        write_section(SECTION, section(json.loads(RESULTS.read_text())))
        return
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from app.ml.preferences import split_by_prompt

    if args.quick:
        from tests.tiny_models import save_tiny_model

        backbone = str(save_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
        args.prompts, args.max_new_tokens = 12, 8
        closed_loop.REQUIRE_EOS = closed_loop.REQUIRE_TOPIC = False  # as its --quick
    else:
        from app.ml.loading import resolve_model_dir

        backbone = str(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    prompts = load_prompts(args.prompts)
    generated = answers_for(prompts, backbone, args.answers, args.max_new_tokens)
    print(f"answers: {len(prompts)} prompts x {args.answers} in {generated['seconds']:.0f} s")

    date = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    command = "python bench/rule_reward.py " + " ".join(sys.argv[1:])
    rules = args.rule or sorted(RULES)
    settings = args.setting or list(REWARD_SETTINGS)
    rows = []
    for name in rules:
        rule = RULES[name]
        examples, ties, verdicts = labelled_pairs(rule, prompts, generated["answers"])
        base_rate = sum(
            rule.shows(q, text, cut)
            for q, group in zip(prompts, generated["answers"], strict=True)
            for text, cut in group
        ) / (len(prompts) * args.answers)
        # Split the decided pairs (validation accuracy is over those); the ties of every prompt
        # outside validation train the settings that train on ties.
        train, val = split_by_prompt(examples, args.val_fraction, seed=0)
        val_groups = {e.group_key for e in val}
        train += [e for e in ties if e.group_key not in val_groups]
        print(f"{name}: {verdicts}, behaviour rate {base_rate:.2f}, {len(train)}/{len(val)} pairs")
        if not train or not val:
            continue  # only the tiny model's smoke run meets a rule with no decided pairs
        for setting, fraction in itertools.product(settings, args.train_fraction or [1.0]):
            if args.quick and REWARD_SETTINGS[setting]["train_mode"] == "lora":
                continue  # the tiny model has no LoRA target modules by those names
            part = first_prompts(train, fraction)
            decided = sum(e.label != 0.5 for e in part)
            scored = train_and_score(backbone, REWARD_SETTINGS[setting], part, val)
            row = {
                "rule": name, "setting": setting, "config": REWARD_SETTINGS[setting],
                "train_fraction": fraction, "train_pairs": decided, "val_pairs": len(val),
                "verdicts": verdicts, "behaviour_rate": base_rate, **scored, "date": date,
                "command": command,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.quick:
        return
    result = {
        "prompts": len(prompts), "answers": args.answers, "max_new_tokens": args.max_new_tokens,
        "val_fraction": args.val_fraction, "generation_seconds": generated["seconds"],
        "rows": rows, "common": COMMON, "torch_threads": args.torch_threads or os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python"
                   f" {platform.python_version()}",
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    new = {row_key(r) for r in rows}
    kept = [r for r in stored["rows"] if row_key(r) not in new]
    result["rows"] = kept + rows
    if "note" in stored:  # what is said of earlier invocations' rows
        result["note"] = stored["note"]
    RESULTS.write_text(json.dumps(result, indent=1))
    write_section(SECTION, section(result))


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    low, high = row["val_interval"]
    return f"{row['val_accuracy']:.2f} [{low:.2f}, {high:.2f}], {row['seconds']:.0f} s"


def section(result: dict[str, Any]) -> str:
    rows = result["rows"]
    whole = [r for r in rows if r["train_fraction"] == 1.0]
    settings = list(dict.fromkeys(r["setting"] for r in whole))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    by = {row_key(r): r for r in rows}
    commands = ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    dates = sorted({r["date"] for r in rows})
    lines = [
        SECTION,
        "",
        f"{commands} ({dates[0]} to {dates[-1]}, {result['machine']}, torch threads"
        f" {result['torch_threads']}; the closed-loop bench ran beside it). The base policy"
        f" (SmolLM2-135M-Instruct) answers {result['prompts']} closed-loop prompts"
        f" {result['answers']} times each (temperature 0.9, {result['max_new_tokens']} new tokens,"
        " as the loop's first round), each rule judges every pair of answers to a prompt as the"
        " loop's simulated raters do, and the decided pairs are split by prompt"
        f" ({result['val_fraction']:.0%} validation). Each setting (`closed_loop.REWARD_SETTINGS`)"
        " trains on the same pairs with the `reward` run's trainer, evaluated once, at the end;"
        " a cell is validation accuracy [Wilson 95 %], training seconds. Common to all: "
        + ", ".join(f"`{k}` {v}" for k, v in result["common"].items())
        + ". "
        + result.get("note", ""),
        "",
        "| setting | config | " + " | ".join(rules) + " |",
        "|---|---|" + "---|" * len(rules),
    ]
    for setting in settings:
        config = next(r["config"] for r in whole if r["setting"] == setting)
        knobs = ", ".join(f"{k} {v}" for k, v in config.items())
        cells = [cell(by.get((rule, setting, 1.0))) for rule in rules]
        lines.append(f"| `{setting}` | {knobs} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| rule | behaviour rate (base) | a / b / tie / both bad | train / val pairs"
        " | train accuracy, best setting |",
        "|---|---|---|---|---|",
    ]
    for rule in rules:
        row = max((r for r in whole if r["rule"] == rule), key=lambda r: r["val_accuracy"])
        v = row["verdicts"]
        lines.append(
            f"| {rule} | {row['behaviour_rate']:.0%} | {v['a']} / {v['b']} / {v['tie']} /"
            f" {v['both_bad']} | {row['train_pairs']} / {row['val_pairs']}"
            f" | {row['train_accuracy']:.2f} (`{row['setting']}`) |"
        )
    curves = sorted({(r["rule"], r["setting"]) for r in rows if r["train_fraction"] < 1.0})
    if curves:
        lines += [
            "",
            "Learning curves: the same validation pairs, training on the first share of the"
            " training prompts (a cell: training pairs, validation accuracy [Wilson 95 %]).",
            "",
            "| rule | setting | " + " | ".join(f"{f:.0%}" for f in CURVE) + " |",
            "|---|---|" + "---|" * len(CURVE),
        ]
        for rule, setting in curves:
            points = [by.get((rule, setting, f)) for f in CURVE]
            lines.append(
                f"| {rule} | `{setting}` | "
                + " | ".join(
                    "" if r is None else f"{r['train_pairs']}: {cell(r).rsplit(',', 1)[0]}"
                    for r in points
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
