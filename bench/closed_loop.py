"""The closed loop with simulated raters: does the promoted policy move toward the raters' rule?

    .venv/bin/python bench/closed_loop.py           # SmolLM2, up to 3 rounds; writes the section
    .venv/bin/python bench/closed_loop.py --quick   # tiny random model, 1 round; prints only

The rule the simulated raters follow (`rule_preference`): *the more concise answer that still
addresses the question*. An answer addresses the question when it has at least `MIN_WORDS`
words, ended by itself (EOS within the token limit, not cut off) and is about the question: it
repeats at least one of the question's content words (`content_words`: alphabetic words of four
letters or more outside a short stop list, a trailing "s" or "'s" dropped). Between two answers
that address it, the one with fewer words wins, equal word counts are a tie; an answer that
addresses it beats one that does not; two that do not are `both_bad`. (The topic test closes
the cheapest hack of a pure length rule, which an earlier run of this benchmark found: "What a
great question!" is three words, ends, and answers nothing.)

Everything goes through the product's REST API (in-process ASGI client on the real app) and a
real `--pool=solo` Celery worker on the embedded stack (SQLite + SQLite broker): upload prompts
(the upload queues the first generation), lease and judge every pair as the simulated raters,
queue a reward run (`POST /runs`, with a CPU-sized config), after which the project's automatic
mode takes over: PPO against the new reward model, evaluation on held-out prompts, promotion by
the rule (score gain ≥ 0, KL ≤ `MAX_KL`), and generation of the next round by the new policy.
After the last round, the final active policy and the base policy answer the held-out prompts
through `POST /api/v1/models/{id}/generate`, the rule judges each pair (win = 1, tie = ½), and
the final reward model scores both answers through `POST /api/v1/models/{id}/score` to measure
its accuracy against the rule on pairs the rule does not call a tie.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.core.db import unit_of_work  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services import users  # noqa: E402

SECTION = "## Closed loop"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MIN_WORDS = 3
# The tiny random model of --quick never ends an answer by itself; its smoke run drops the
# "not cut off" half of the rule so that the raters have preferences to express.
REQUIRE_EOS = True
# Nor does it write about anything, so the smoke run drops the topic test as well.
REQUIRE_TOPIC = True
# The project's promotion rule: a candidate more than this many nats (mean sequence KL on the
# held-out prompts) from its parent is not promoted. Sensible rounds have measured 1.6-4.6; at
# 25 (no limit in practice) run 4 promoted a first round at 7.1 whose policy went on to answer
# in degenerate text (docs/benchmarks.md).
MAX_KL = 5.0
FINISHED = ("succeeded", "failed", "cancelled")


# --- the simulated raters' rule ----------------------------------------------------------------


STOP_WORDS = frozenset(
    """
    about above after again against also because been before being below between both but could
    does doing down during each from further have having here hers herself himself into itself
    just more most myself once only other ours over same should some such than that their theirs
    them then there these they this those through under until very were what when where which
    while whom would your yours yourself want need know tell like make good thing things someone
    something anyone anything please really
    """.split()  # noqa: SIM905 (a word list reads best as words)
)


def content_words(text: str) -> set[str]:
    """Lower-cased words of four letters or more outside STOP_WORDS, plural/possessive cut."""
    words = set()
    for raw in text.lower().split():
        word = raw.strip(".,!?;:\"'()[]{}*-")
        for suffix in ("'s", "s"):
            if word.endswith(suffix) and len(word) > 4:
                word = word[: -len(suffix)]
                break
        if len(word) >= 4 and word.isalpha() and word not in STOP_WORDS:
            words.add(word)
    return words


def addresses(question: str, text: str, truncated: bool) -> bool:
    """At least MIN_WORDS words, ended by itself, and shares a content word with the question."""
    if (truncated and REQUIRE_EOS) or len(text.split()) < MIN_WORDS:
        return False
    topic = content_words(question)
    return not (REQUIRE_TOPIC and topic) or bool(topic & content_words(text))


def rule_preference(question: str, a: str, a_truncated: bool, b: str, b_truncated: bool) -> str:
    """'a', 'b', 'tie' or 'both_bad' under the rule (the more concise answer that addresses
    the question)."""
    ok_a, ok_b = addresses(question, a, a_truncated), addresses(question, b, b_truncated)
    if not ok_a and not ok_b:
        return "both_bad"
    if ok_a != ok_b:
        return "a" if ok_a else "b"
    words_a, words_b = len(a.split()), len(b.split())
    if words_a == words_b:
        return "tie"
    return "a" if words_a < words_b else "b"


# --- helpers -----------------------------------------------------------------------------------


def load_prompts(count: int) -> list[str]:
    """The first `count` distinct first human turns of the HH-RLHF harmless-base test split."""
    prompts: list[str] = []
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            first = text.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
            if first and first not in prompts and len(first) < 200:
                prompts.append(first)
            if len(prompts) == count:
                break
    return prompts


class Bench:
    def __init__(self, client: TestClient, admin: dict[str, str], rater: dict[str, str]) -> None:
        self.client, self.admin, self.rater = client, admin, rater
        self.times: list[tuple[str, float]] = []

    def get(self, url: str) -> Any:
        response = self.client.get(url, headers=self.admin)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        response = self.client.post(url, json=body, headers=headers or self.admin)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def wait(self, run_id: int, stage: str, timeout: float = 3600) -> dict[str, Any]:
        started = time.monotonic()
        while True:
            run: dict[str, Any] = self.get(f"/api/v1/runs/{run_id}")
            if run["status"] in FINISHED:
                break
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{stage}: run {run_id} still {run['status']}")
            time.sleep(1.0)
        seconds = time.monotonic() - started
        self.times.append((stage, seconds))
        print(f"  {stage}: run {run_id} {run['status']} in {seconds:.0f}s", flush=True)
        if run["status"] != "succeeded":
            raise RuntimeError(f"{stage}: run {run_id} {run['status']}: {run['error']}")
        return run

    def judge_all(self, slug: str, truncated: Callable[[int], bool]) -> int:
        started, count = time.monotonic(), 0
        while True:
            response = self.client.get(
                f"/api/v1/projects/{slug}/assignments/next", headers=self.rater
            )
            if response.status_code == 204:
                break
            item = response.json()
            a, b = item["response_a"], item["response_b"]
            question = item["prompt"]["messages"][-1]["content"]
            choice = rule_preference(
                question, a["text"], truncated(a["id"]), b["text"], truncated(b["id"])
            )
            body: dict[str, Any] = {"choice": choice}
            if choice in ("a", "b"):
                body["strength"] = 1
            self.post(f"/api/v1/assignments/{item['id']}/judgment", body, self.rater)
            count += 1
        self.times.append(("judging (simulated raters, API)", time.monotonic() - started))
        return count


def truncation_lookup(settings: Settings) -> Callable[[int], bool]:
    """Whether a stored response was cut at the token limit: what a rater sees as an answer
    that stops mid-sentence (the API shows the text; the flag is the same fact, exactly)."""
    from app.core.db import new_session
    from app.models import Response

    def truncated(response_id: int) -> bool:
        with new_session(settings.database_url) as s:
            row = s.get(Response, response_id)
            return bool(row and row.truncated)

    return truncated


def final_comparison(
    bench: Bench, slug: str, final_id: int, base_id: int, reward_id: int | None,
    prompts: list[str], max_new_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """Final vs base policy on the held-out prompts under the rule, and the reward model's
    agreement with the rule on the same answers."""
    wins = ties = 0.0
    agree = decided = 0
    rows = []
    examples: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, prompt in enumerate(prompts):
        answers = {}
        for version_id in (final_id, base_id):
            out = bench.post(
                f"/api/v1/models/{version_id}/generate?timeout_s=600",
                {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.7,
                 "seed": i},
            )  # fmt: skip
            answers[version_id] = out["responses"][0]
        final, base = answers[final_id], answers[base_id]
        verdict = rule_preference(
            prompt, final["text"], final["truncated"], base["text"], base["truncated"]
        )
        wins += 1.0 if verdict == "a" else 0.0
        ties += 1.0 if verdict in ("tie", "both_bad") else 0.0
        if reward_id is not None and verdict in ("a", "b"):
            scores = bench.post(
                f"/api/v1/models/{reward_id}/score?timeout_s=600",
                {"prompt": prompt, "responses": [final["text"], base["text"]]},
            )["scores"]
            decided += 1
            agree += int((scores[0] > scores[1]) == (verdict == "a"))
        rows.append((len(final["text"].split()), len(base["text"].split()), verdict))
        examples.append({"prompt": prompt, "final": final, "base": base, "verdict": verdict})
    bench.times.append(("final comparison (API playground)", time.monotonic() - started))
    n = len(prompts)
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "ties": ties,
        "prompts": n,
        "rm_accuracy": agree / decided if decided else None,
        "rm_pairs": decided,
        "final_words": sum(r[0] for r in rows) / n,
        "base_words": sum(r[1] for r in rows) / n,
        "examples": examples,
    }


# --- main --------------------------------------------------------------------------------------


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool=solo",
         "-Q", "gpu,default", "-n", "bench@%h", "--loglevel=info", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc


def run(args: argparse.Namespace) -> dict[str, Any]:
    var = Path(tempfile.mkdtemp(prefix="verdict-closed-loop-"))
    if args.quick:
        from tests.tiny_models import save_tiny_model

        base_policy = str(save_tiny_model(var / "tiny"))
    else:
        from app.ml.loading import resolve_model_dir

        base_policy = str(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    settings = Settings(
        database_url=f"sqlite:///{var / 'verdict.db'}",
        broker_url=f"sqla+sqlite:///{var / 'broker.sqlite'}",
        var_dir=var,
        secret_key="closed-loop-bench-" + "x" * 32,
    )
    upgrade_database(settings)
    env = {
        **os.environ, "VERDICT_DATABASE_URL": settings.database_url,
        "VERDICT_BROKER_URL": settings.broker_url, "VERDICT_VAR_DIR": str(var),
        "VERDICT_SECRET_KEY": settings.secret_key or "", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    app = create_app(settings)
    with unit_of_work(app.state.sessionmaker) as s:
        admin = users.create_user(s, "bench-admin@example.com", "long enough pw", "admin")
        rater = users.create_user(s, "bench-rater@example.com", "long enough pw", "rater")
        admin_h = {"Authorization": f"Bearer {users.create_token(s, admin, 'b').secret}"}
        rater_h = {"Authorization": f"Bearer {users.create_token(s, rater, 'b').secret}"}

    n_prompts = 24 if args.quick else args.prompts
    prompts = load_prompts(n_prompts)
    project_settings = {
        "base_policy": base_policy, "overlap": 1, "gold_rate": 0.0, "responses_per_prompt": 2,
        "max_new_tokens": args.max_new_tokens, "temperature": 0.9, "auto_mode": True,
        "reward_retrain_threshold": 1_000_000,  # the bench queues reward runs itself
        "min_reward_accuracy": 0.0 if args.quick else args.min_reward_accuracy,
        "promote_min_score_gain": -1e9 if args.quick else 0.0,
        "promote_max_kl": 1e9 if args.quick else MAX_KL,
        "version_eval_rate": 0.25, "heldout_fraction": 0.25, "heldout_seed": 0,
        "loop_ppo_config": {
            "total_steps": 2 if args.quick else args.ppo_steps, "batch_size": 8,
            "mini_batch_size": 4, "ppo_epochs": 2, "use_lora": not args.quick,
            "learning_rate": 1e-3 if args.quick else args.ppo_lr, "kl_coef": 0.05,
            "temperature": 0.9, "missing_eos_penalty": 1.0,
        },
        "loop_evaluate_config": {"max_prompts": 16, "batch_size": 8, "temperature": 0.9},
        "loop_generation_config": {"batch_size": 16},
    }  # fmt: skip
    reward_config = {
        "train_mode": "full" if args.quick else "last_n", "last_n_layers": 4, "epochs": 2,
        "learning_rate": 1e-3 if args.quick else 1e-4, "batch_size": 8, "max_length": 256,
        "val_fraction": 0.2,
    }  # fmt: skip
    worker = start_worker(env, var / "worker.log")
    total_start = time.monotonic()
    rounds: list[dict[str, Any]] = []
    try:
        with TestClient(app) as client:
            bench = Bench(client, admin_h, rater_h)
            slug = "closed-loop"
            bench.post(
                "/api/v1/projects",
                {"slug": slug, "name": "Closed loop", "settings": project_settings},
            )
            upload = bench.post(
                f"/api/v1/projects/{slug}/prompts",
                {"prompts": [{"prompt": p, "external_id": f"hh-{i}"}
                             for i, p in enumerate(prompts)]},
            )  # fmt: skip
            generation = bench.wait(upload["generation_run_id"], "generation r1")
            truncated = truncation_lookup(settings)
            for number in range(1, args.rounds + 1):
                info: dict[str, Any] = {"round": number}
                info["judgments"] = bench.judge_all(slug, truncated)
                reward = bench.post(
                    f"/api/v1/projects/{slug}/runs", {"kind": "reward", "config": reward_config}
                )
                reward = bench.wait(reward["id"], f"reward r{number}")
                info["reward_val_accuracy"] = reward["result"]["metrics"].get("best_val_accuracy")
                info["reward_model_id"] = reward["result"]["model_version_id"]
                if reward["result"].get("ppo_run_id") is None:
                    info["stopped"] = "reward model below min_reward_accuracy: no PPO run"
                    rounds.append(info)
                    break
                ppo = bench.wait(reward["result"]["ppo_run_id"], f"ppo r{number}")
                evaluate = bench.wait(ppo["result"]["evaluate_run_id"], f"evaluate r{number}")
                info.update(
                    score_gain=evaluate["result"]["evaluation"]["score_gain"],
                    kl=evaluate["result"]["evaluation"]["kl_to_parent"],
                    promoted=evaluate["result"]["promoted"],
                )
                rounds.append(info)
                print(f"round {number}: {info}", flush=True)
                if not evaluate["result"]["promoted"]:
                    info["stopped"] = f"not promoted: {evaluate['result']['rule']}"
                    break
                if number < args.rounds:
                    generation = bench.wait(
                        evaluate["result"]["generation_run_id"], f"generation r{number + 1}"
                    )
            del generation
            models = bench.get(f"/api/v1/projects/{slug}/models?kind=policy")
            final = next(m for m in models if m["status"] == "active")
            base = next(m for m in models if m["version"] == 0)
            held = load_heldout(settings, slug)
            comparison = final_comparison(
                bench, slug, final["id"], base["id"],
                rounds[-1].get("reward_model_id") if rounds else None, held, args.max_new_tokens,
            )  # fmt: skip
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(60)
    total = time.monotonic() - total_start
    result = {
        "rounds": rounds, "final_version": final["version"], "comparison": comparison,
        "times": bench.times, "total_s": total, "prompts": n_prompts, "heldout": len(held),
        "base_policy": "tiny random model" if args.quick else "SmolLM2-135M-Instruct",
        "args": vars(args), "ppo_config": project_settings["loop_ppo_config"],
        "promotion": (project_settings["promote_min_score_gain"],
                      project_settings["promote_max_kl"]),
    }  # fmt: skip
    if not args.keep:
        shutil.rmtree(var, ignore_errors=True)
    return result


def load_heldout(settings: Settings, slug: str) -> list[str]:
    """The held-out prompts, as the project's split defines them (never trained on by PPO)."""
    from sqlalchemy import select

    from app.core.db import new_session
    from app.models import Prompt
    from app.services import evaluation, projects

    with new_session(settings.database_url) as s:
        project = projects.get_project(s, slug)
        ps = projects.project_settings(project)
        _, ids = evaluation.project_prompt_split(s, project, ps.heldout_fraction, ps.heldout_seed)
        rows = {p.id: p.text or "" for p in s.scalars(select(Prompt).where(Prompt.id.in_(ids)))}
        return [rows[i] for i in ids]


def section(result: dict[str, Any]) -> str:
    cmp, ppo = result["comparison"], result["ppo_config"]
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/closed_loop.py`  ",
        f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python "
        f"{platform.python_version()}  ",
        f"Policy: {result['base_policy']}; {result['prompts']} HH-RLHF first human turns "
        f"({result['heldout']} held out); rule: the more concise answer that still addresses the"
        f" question (≥ {MIN_WORDS} words, not cut off, shares a content word with the question;"
        " see `bench/closed_loop.py`).  ",
        f"PPO per round: {'LoRA' if ppo['use_lora'] else 'full'}, {ppo['total_steps']} steps of "
        f"{ppo['batch_size']}, learning rate {ppo['learning_rate']:g}, β {ppo['kl_coef']:g}; "
        f"promotion: score gain ≥ {result['promotion'][0]:g} and KL ≤ {result['promotion'][1]:g}.",
        "",
        f"**Final policy v{result['final_version']} vs base on held-out prompts, under the rule: "
        f"win rate {cmp['win_rate']:.1%}** ({cmp['wins']:.0f} wins, {cmp['ties']:.0f} ties of "
        f"{cmp['prompts']}; mean words {cmp['final_words']:.1f} vs {cmp['base_words']:.1f}). "
        + (f"Reward model accuracy against the rule: {cmp['rm_accuracy']:.1%} on "
           f"{cmp['rm_pairs']} decided pairs. " if cmp["rm_accuracy"] is not None else "")
        + f"Total wall time: {result['total_s'] / 60:.1f} min.",
        "", "| round | judgments | RM val acc | score gain | KL | promoted |",
        "|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['judgments']} | {r.get('reward_val_accuracy') or 0:.2f} | "
            f"{r.get('score_gain', float('nan')):+.3f} | {r.get('kl', float('nan')):.2f} | "
            f"{r.get('promoted', False)}{' (' + r['stopped'] + ')' if 'stopped' in r else ''} |"
        )
    lines += ["", "| stage | wall s |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in result["times"]]
    lines += [
        "", f"The first {EXAMPLES} held-out prompts, as the rule judged them (a = final policy; an "
        "answer cut off at the token limit ends in …):", "",
        "| prompt | final policy | base policy | rule |", "|---|---|---|---|",
    ]  # fmt: skip
    for ex in cmp["examples"][:EXAMPLES]:
        cells = [ex["prompt"], answer_cell(ex["final"]), answer_cell(ex["base"]), ex["verdict"]]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


EXAMPLES = 6


def answer_cell(answer: dict[str, Any]) -> str:
    text = " ".join(answer["text"].split())
    text = text if len(text) <= 160 else text[:160] + "…"
    return text + (" …" if answer["truncated"] and not text.endswith("…") else "")


def markdown_cell(text: str) -> str:
    """Model output in a Markdown table cell: one line, pipes and markup characters escaped."""
    text = " ".join(text.split())
    for char in "\\`*_[]<>|":
        text = text.replace(char, "\\" + char)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, no docs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ppo-steps", type=int, default=12)
    parser.add_argument(
        "--ppo-lr",
        type=float,
        default=2e-4,
        help="PPO learning rate (LoRA); at 3e-4 one round can move the policy 7 nats from its"
        " parent (docs/benchmarks.md, runs 4 and 5)",
    )
    parser.add_argument(
        "--min-reward-accuracy",
        type=float,
        default=0.5,
        help="the project's gate for queueing PPO after a reward run; with the ~10-20 validation"
        " pairs a round yields, 0.6 rejects a reward model of true accuracy 0.7 about one time in"
        " four, so the bench only asks for better than chance",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary var directory")
    args = parser.parse_args()
    if args.quick:
        global REQUIRE_EOS, REQUIRE_TOPIC
        REQUIRE_EOS = REQUIRE_TOPIC = False
        args.rounds, args.max_new_tokens = 1, 8
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2, default=str))
    text = section(result)
    print(text)
    if args.quick:
        print("(--quick: docs/benchmarks.md left unchanged)", file=sys.stderr)
    else:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
