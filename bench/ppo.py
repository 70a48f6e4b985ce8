"""PPO throughput and memory on SmolLM2-135M: Verdict's `app.ml.ppo` vs TRL 1.12's PPOTrainer.

    .venv/bin/python bench/ppo.py --quick          # a smoke run of every variant (minutes)
    .venv/bin/python bench/ppo.py --write-docs     # the full comparison, written to the docs

Policy: SmolLM2-135M-Instruct (`resolve_model_dir("smollm2", var/artifacts)`). Reward model:
SmolLM2-135M's backbone with an UNTRAINED, seeded scalar head (`num_labels=1`). Its scores mean
nothing; it is here because throughput and memory depend on the architecture, not on what the
head learned. The value model starts from it, as in both implementations.

Each variant (ours / TRL, full fine-tuning / LoRA) runs in its own process, so peak memory is
that variant's alone: peak resident set size on the CPU, `torch.cuda.max_memory_allocated` on a
GPU. TRL runs in its own virtual environment (`var/bench-venv-trl112`, created by this script:
`torch==2.13.0` first, so pip keeps the CPU build, then `trl==1.12.*`, the last release with
PPO). Both get the same prompts (first human turns of the HH-RLHF harmless-base test split),
the same batch, micro-batch, PPO epochs, response length, temperature and KL/EOS settings.
Each implementation runs `--rounds` times per setting (default 2), alternating which goes first,
and the verdict takes the median of the rounds' ratios: on a shared machine memory bandwidth
drifts by several percent from one run to the next.

Figures:
- rollout tokens/s: real response tokens (up to the first EOS) per second of the rollout
  phase: sampling plus the policy, reference, value and reward forward passes.
- update samples/s: responses x PPO epochs per second of the update phase (the clipped policy
  and value losses, backward, optimizer steps).
The first step is a warm-up and is left out when more than one step runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / "var" / "bench-venv-trl112"
WORK = ROOT / "var" / "bench" / "ppo"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

FULL = {"steps": 5, "batch": 4, "micro": 2, "epochs": 2, "new_tokens": 32, "prompt_tokens": 96}
QUICK = {"steps": 1, "batch": 2, "micro": 2, "epochs": 1, "new_tokens": 16, "prompt_tokens": 64}
SEED = 0
COMMON = {"temperature": 0.7, "kl_coef": 0.05, "missing_eos_penalty": 1.0}
LORA = {"r": 16, "alpha": 32}


# ---- shared helpers (run in both virtual environments: stdlib, torch, transformers only) -------


def peak_memory_bytes() -> int:
    """Peak GPU allocation when on CUDA, else this process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def load_prompts(n: int) -> list[str]:
    """First human turns of real HH-RLHF transcripts (built-in questions if it is missing)."""
    prompts: list[str] = []
    if HH_RLHF.exists():
        with gzip.open(HH_RLHF, "rt") as f:
            for line in f:
                text = json.loads(line)["chosen"]
                match = re.search(r"Human: (.*?)\n\nAssistant:", text, re.S)
                if match and match.group(1).strip():
                    prompts.append(match.group(1).strip())
                if len(prompts) == n:
                    break
    fallback = ["What is the capital of France?", "How do I bake bread?", "Explain gravity."]
    while len(prompts) < n:
        prompts.append(fallback[len(prompts) % len(fallback)])
    return prompts


class PhaseClock:
    """Wall and CPU time of each step's rollout and update phases, and its response tokens.

    Both implementations are timed at the same boundaries: the rollout starts at the first
    sampling call of a step, the update at the first forward pass with gradients (TRL) or the
    update function (ours), and the step ends when the update has finished.
    """

    def __init__(self) -> None:
        self.rollout: list[tuple[float, float]] = []
        self.update: list[tuple[float, float]] = []
        self.tokens: list[int] = []
        self._rollout_start: tuple[float, float] | None = None
        self._update_start: tuple[float, float] | None = None
        self._step_tokens = 0

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def sampling_starts(self) -> None:
        """Called before every sampling call; the step's first one starts its rollout."""
        if self._rollout_start is None:
            self._rollout_start = self.now()

    def sampled(self, tokens: int) -> None:
        self._step_tokens += tokens

    def update_started(self) -> None:
        if self._update_start is None and self._rollout_start is not None:
            self._update_start = self.now()

    def step_ended(self) -> None:
        end = self.now()
        assert self._rollout_start is not None and self._update_start is not None
        r, u = self._rollout_start, self._update_start
        self.rollout.append((u[0] - r[0], u[1] - r[1]))
        self.update.append((end[0] - u[0], end[1] - u[1]))
        self.tokens.append(self._step_tokens)
        self._rollout_start = self._update_start = None
        self._step_tokens = 0

    def summary(self, s: dict[str, Any]) -> dict[str, Any]:
        """Throughput over the measured steps (the first is a warm-up when there are several)."""
        skip = 1 if len(self.update) > 1 else 0
        rollout, update, tokens = self.rollout[skip:], self.update[skip:], self.tokens[skip:]
        samples = s["batch"] * s["epochs"] * len(update)
        return {
            "rollout_tokens_per_s": sum(tokens) / sum(w for w, _ in rollout),
            "rollout_tokens_per_cpu_s": sum(tokens) / sum(c for _, c in rollout),
            "update_samples_per_s": samples / sum(w for w, _ in update),
            "update_samples_per_cpu_s": samples / sum(c for _, c in update),
            "step_s": (sum(w for w, _ in rollout) + sum(w for w, _ in update)) / len(update),
            "mean_response_tokens": sum(tokens) / (len(tokens) * s["batch"]),
            "peak_memory_bytes": peak_memory_bytes(),
        }


def real_tokens(responses: Any, eos: int) -> int:
    """Response tokens up to and including the first EOS, summed over rows."""
    total = 0
    for row in responses.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


# ---- worker: ours ----------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch

    from app.ml import ppo, rollout

    torch.set_num_threads(args.threads)
    config = ppo.PPOConfig(
        seed=SEED,
        total_steps=s["steps"],
        batch_size=s["batch"],
        mini_batch_size=s["batch"],
        gradient_accumulation_steps=s["batch"] // s["micro"],
        ppo_epochs=s["epochs"],
        learning_rate=1e-5 if args.lora else 1e-6,
        max_prompt_length=s["prompt_tokens"],
        max_new_tokens=s["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        missing_eos_penalty=COMMON["missing_eos_penalty"],
        use_lora=args.lora,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        rollout_forward_batch_size=s["batch"],
        sample_every=10**6,
        checkpoint_every=10**6,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    clock = PhaseClock()
    original_sample, original_update = rollout.sample_responses, ppo._ppo_update

    def timed_sample(*a: Any, **kw: Any) -> Any:
        clock.sampling_starts()
        out = original_sample(*a, **kw)
        clock.sampled(real_tokens(out[0], a[5]))  # a[5]: eos_token_id
        return out

    def timed_update(*a: Any, **kw: Any) -> Any:
        clock.update_started()
        out = original_update(*a, **kw)
        clock.step_ended()
        return out

    rollout.sample_responses, ppo._ppo_update = timed_sample, timed_update
    scratch = Path(tempfile.mkdtemp(dir=WORK, prefix="ours."))
    try:
        ppo.train_ppo(
            config,
            args.policy,
            args.reward,
            load_prompts(s["batch"] * s["steps"]),
            scratch / "out",
            scratch / "ckpt",
            None,
            resume=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return clock.summary(s)


# ---- worker: TRL 1.12 --------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, s: dict[str, Any]) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    prompt_ids = []
    for p in load_prompts(s["batch"] * s["steps"]):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids.append(
            tokenizer(text, add_special_tokens=False)["input_ids"][-s["prompt_tokens"] :]
        )
    dataset = Dataset.from_dict({"input_ids": prompt_ids})

    clock = PhaseClock()
    original_generation, original_forward = module.batch_generation, module.forward

    def timed_generation(model: Any, queries: Any, *rest: Any, **kw: Any) -> Any:
        clock.sampling_starts()
        out = original_generation(model, queries, *rest, **kw)
        clock.sampled(real_tokens(out[0][:, queries.shape[1] :], eos))
        return out

    def timed_forward(model: Any, *rest: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():
            clock.update_started()
        return original_forward(model, *rest, **kw)

    module.batch_generation, module.forward = timed_generation, timed_forward

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.step_ended()

    use_cuda = torch.cuda.is_available()
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    ref = None if args.lora else AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    scratch = Path(tempfile.mkdtemp(dir=WORK, prefix="trl."))
    config = PPOConfig(
        output_dir=str(scratch),
        seed=SEED,
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=s["batch"] // s["micro"],
        num_mini_batches=1,
        num_ppo_epochs=s["epochs"],
        total_episodes=s["batch"] * s["steps"],
        local_rollout_forward_batch_size=s["batch"],
        learning_rate=1e-5 if args.lora else 1e-6,
        response_length=s["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        missing_eos_penalty=COMMON["missing_eos_penalty"],
        stop_token="eos",
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        use_cpu=not use_cuda,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=peft_config,
        callbacks=[StepTimer()],
    )
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = clock.summary(s)
    result["trl_version"] = trl.__version__
    return result


# ---- orchestration (our virtual environment) -----------------------------------------------


def ensure_trl_venv() -> Path:
    """Create `var/bench-venv-trl112` once: CPU torch 2.13.0 first, then TRL 1.12 and peft."""
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, peft; assert trl.__version__.startswith('1.12')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "trl==1.12.*", "peft"], check=True)
    return python


def ensure_models() -> tuple[Path, Path]:
    """The SmolLM2 policy directory and a reward model with an untrained, seeded head."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

    from app.ml.loading import resolve_model_dir

    policy = Path(resolve_model_dir("smollm2", ROOT / "var" / "artifacts"))
    rm_dir = WORK / "smollm2-rm-untrained-head"
    if not (rm_dir / "config.json").exists():
        lm = AutoModelForCausalLM.from_pretrained(str(policy))
        tokenizer = AutoTokenizer.from_pretrained(str(policy))
        config = lm.config
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(0)
        rm = LlamaForSequenceClassification(config)
        rm.model.load_state_dict(lm.model.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=WORK, prefix=".rm."))
        rm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, rm_dir)
    return policy, rm_dir


def run_variant(
    python: Path, impl: str, lora: bool, policy: Path, rm: Path, args: argparse.Namespace
) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", impl]
    cmd += ["--threads", str(args.threads)]
    cmd += ["--policy", str(policy), "--reward", str(rm)]
    cmd += ["--lora"] if lora else []
    cmd += ["--quick"] if args.quick else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - started
    return result


def markdown(
    results: list[dict], s: dict[str, Any], args: argparse.Namespace, seconds: float
) -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    mem = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    flags = " --quick" if args.quick else ""
    rounds = 1 + max((r.get("round", 0) for r in results), default=0)
    lines = [
        "## PPO",
        "",
        "`bench/ppo.py`: SmolLM2-135M-Instruct policy; reward model = SmolLM2-135M backbone with",
        "an **untrained** scalar head (scores are meaningless; throughput and memory are what is",
        "measured); value model initialised from it. Ours (`app/ml/ppo.py`) vs TRL 1.12",
        "`trl.experimental.ppo.PPOTrainer` (last release with PPO) in its own virtual environment,",
        "same prompts (HH-RLHF harmless-base test, first human turns) and settings. Each variant",
        "runs in its own process; both are timed at the same phase boundaries.",
        "",
        f"Command: `.venv/bin/python bench/ppo.py{flags} --write-docs`"
        f" ({'quick smoke settings, not the comparison' if args.quick else 'full settings'}).",
        f"Machine: {device}, {os.cpu_count()} CPU cores shared with other jobs, so each run uses "
        f"{args.threads} torch thread(s) and throughput is also given per CPU-second, which "
        f"contention changes far less than wall time. Python {platform.python_version()}, torch "
        f"{torch.__version__}. Total wall time {seconds / 60:.1f} min.",
        f"Settings: batch {s['batch']} prompts, micro-batch {s['micro']}, {s['epochs']} PPO "
        f"epoch(s), up to {s['new_tokens']} new tokens, prompts cut to {s['prompt_tokens']} "
        f"tokens, temperature {COMMON['temperature']}, {s['steps']} step(s)"
        f"{' (the first left out as warm-up)' if s['steps'] > 1 else ''}; LoRA r={LORA['r']} on "
        f"all linear layers. {rounds} run(s) of each implementation per setting, alternating "
        "which goes first; the verdict takes the median of the runs' ratios.",
        "",
        "| run | implementation | LoRA | rollout tok/s | rollout tok/CPU-s | update samples/s | "
        f"update samples/CPU-s | step s | {mem} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = "Verdict" if r["impl"] == "ours" else f"TRL {r.get('trl_version', '1.12')}"
        uses_lora = "yes" if r["lora"] else "no"
        run = r.get("round", 0) + 1
        if "error" in r:
            lines.append(f"| {run} | {name} | {uses_lora} | failed | | | | | |")
            continue
        lines.append(
            f"| {run} | {name} | {uses_lora} | {r['rollout_tokens_per_s']:.2f} | "
            f"{r['rollout_tokens_per_cpu_s']:.2f} | {r['update_samples_per_s']:.3f} | "
            f"{r['update_samples_per_cpu_s']:.3f} | {r['step_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} |"
        )
    lines.append("")
    for lora in (False, True):
        for o, t in pairs(results, lora):

            def ratio(key: str, o: dict = o, t: dict = t) -> str:
                return f"{o[key] / t[key]:.2f}x"

            lines.append(
                f"- {'LoRA' if lora else 'Full fine-tuning'}, run {o.get('round', 0) + 1}, ours /"
                f" TRL: rollout {ratio('rollout_tokens_per_s')} (per CPU-s "
                f"{ratio('rollout_tokens_per_cpu_s')}), update {ratio('update_samples_per_s')} "
                f"(per CPU-s {ratio('update_samples_per_cpu_s')}), memory "
                f"{ratio('peak_memory_bytes')}."
            )
    for r in results:
        if "error" in r:
            lines.append(f"- {r['impl']} (LoRA {r['lora']}) failed: `{r['error'][-300:]!r}`")
    lines += ["", target_line(results, s), "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Reading the figures: wall-clock rates move with whatever else the shared cores run; the",
    "per-CPU-second rates count only this process's work and are the steadier comparison.",
    "The rollout phase runs from the start of the step's first sampling call (sampling, then",
    "the reference, value and reward passes) to the start of the update.",
    "Both implementations keep the sampler's log-probabilities as pi_old. Ours asks the model",
    "for logits at response positions only, where TRL computes them for every position;",
    "with LoRA, ours makes the value model the reward model plus adapters (the reward is read",
    "with the adapters off), while TRL keeps a full trainable value model and a separate",
    "reward model, which is where most of the LoRA memory difference comes from. With LoRA,",
    "ours samples from a merged copy of the policy (W + BA, rewritten from the base before",
    "each rollout) instead of through the adapter layers. Each of our micro-batches drops the",
    "columns that are padding in all of its rows (exact: padding is masked). Ours samples a",
    "Llama model through `app.ml.decode.LlamaDecoder`: the same layers computed from the",
    "model's weights with a preallocated KV cache, without the generic forward's per-step",
    "overhead; TRL calls `generate`. Ours runs the",
    "value pass of the first minibatch once, with gradients, at the rollout, and epoch one",
    "trains on it (the weights have not moved yet), where TRL runs it twice. Ours adds the",
    "gradients of the 49152 x 576 matrices (the tied embedding and output projection, the",
    "value model's embedding) in place into buffers kept between steps (`app.ml.vocab_grads`),",
    "where autograd gives every use a fresh full-size tensor. TRL infers padding from the pad",
    "id, which for SmolLM2 equals EOS; this changes what it trains on, not its speed.",
]


def pairs(results: list[dict], lora: bool) -> list[tuple[dict, dict]]:
    """(ours, TRL) of each round that both finished, for one LoRA setting."""
    found = []
    for n in sorted({r.get("round", 0) for r in results}):
        pair = {
            r["impl"]: r
            for r in results
            if r["lora"] == lora and r.get("round", 0) == n and "error" not in r
        }
        if {"ours", "trl"} <= set(pair):
            found.append((pair["ours"], pair["trl"]))
    return found


def target_line(results: list[dict], s: dict[str, Any]) -> str:
    """Issue 6's target: at least 1.3x TRL's throughput at no more memory, per LoRA setting.

    Throughput here is a whole step's CPU time at the same work for both: `batch` responses of
    `new_tokens` tokens sampled and scored, and `batch x epochs` samples updated.
    """
    verdicts = []
    for lora in (False, True):

        def step_cpu_s(r: dict) -> float:
            rollout = s["batch"] * s["new_tokens"] / r["rollout_tokens_per_cpu_s"]
            return rollout + s["batch"] * s["epochs"] / r["update_samples_per_cpu_s"]

        speeds, memories = [], []
        for o, t in pairs(results, lora):
            speeds.append(step_cpu_s(t) / step_cpu_s(o))
            memories.append(o["peak_memory_bytes"] / t["peak_memory_bytes"])
        if not speeds:
            continue
        speed = statistics.median(speeds)
        met = speed >= 1.3 and max(memories) <= 1.0
        each = ""
        if len(speeds) > 1:
            each = " (rounds: " + ", ".join(f"{x:.2f}x" for x in speeds) + ")"
        verdicts.append(
            f"{'LoRA' if lora else 'full fine-tuning'}: a step costs TRL {speed:.2f}x our CPU "
            f"time{' (median)' if len(speeds) > 1 else ''}{each}, memory at most "
            f"{max(memories):.2f}x TRL's: **{'met' if met else 'not met'}**"
        )
    if not verdicts:
        return "Target (at least 1.3x TRL's throughput at no more memory): no comparison ran."
    return "Target (at least 1.3x TRL's throughput at no more memory): " + "; ".join(verdicts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--skip-trl", action="store_true", help="only our implementation")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (default 1: shared cores)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="runs of each implementation per setting, alternating which goes first, so a slow"
        " spell of a shared machine falls on both (default 2; the verdict takes the median)",
    )
    parser.add_argument(
        "--only",
        choices=["full", "lora"],
        help="run one setting: full fine-tuning or LoRA (default both)",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="re-render the last saved results, run nothing"
    )
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    WORK.mkdir(parents=True, exist_ok=True)

    if args.render_only:
        saved = json.loads(
            (WORK / ("results-quick.json" if args.quick else "results.json")).read_text()
        )
        args.threads = saved["threads"]
        section = markdown(saved["results"], settings, args, saved["seconds"])
        print(section)
        if args.write_docs:
            write_section("## PPO", section)
        return
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_trl)(args, settings)
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    policy, rm = ensure_models()
    pythons = {"ours": Path(sys.executable)}
    if not args.skip_trl:
        pythons["trl"] = ensure_trl_venv()
    results = []
    settings_run = {"full": (False,), "lora": (True,), None: (False, True)}[args.only]
    for lora in settings_run:
        for n in range(1 if args.quick else args.rounds):
            order = list(pythons.items())
            for impl, python in order if n % 2 == 0 else order[::-1]:
                print(f"running {impl} (LoRA {lora}, run {n + 1}) ...", flush=True)
                r = run_variant(python, impl, lora, policy, rm, args)
                r.update(impl=impl, lora=lora, round=n)
                print(json.dumps(r), flush=True)
                results.append(r)
    seconds = time.perf_counter() - started
    (WORK / ("results-quick.json" if args.quick else "results.json")).write_text(
        json.dumps({"results": results, "seconds": seconds, "threads": args.threads}, indent=2)
    )
    section = markdown(results, settings, args, seconds)
    print(section)
    if args.write_docs:
        write_section("## PPO", section)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
