"""Training in several processes: PyTorch's DistributedDataParallel under `torchrun`.

    job ──launch()──► torchrun ──► rank 0 ─┐  DDP all-reduces the gradients (nccl on GPUs,
     ▲   payload.pkl            └► rank 1 ─┘  gloo on CPUs); every rank runs the same loop
     │                                 │
     └── events.jsonl (progress, metrics: rank 0 only) ◄─┘   stop file ──► rank 0 ──► all ranks

Nothing here is home-made distributed training: `torch.distributed.run` (torchrun) starts the
processes and rendezvous, `DistributedDataParallel` averages the gradients. What this module adds
is the contract a Verdict run needs around them, still without the database (`app.ml.hooks`):

* Global batch semantics. A trainer's `batch_size` stays the batch of one optimizer step over all
  processes. Each rank takes its contiguous `shard` of every (micro-)batch and scales its loss by
  the world size, so DDP's gradient *average* equals the one-process gradient of the whole batch,
  and the loss curve is one process's within float tolerance (tests/ml/test_distributed.py). Data
  order and seeds are functions of the config, identical on every rank. A rank whose shard is
  empty (a batch smaller than the world) runs a zero-weighted forward, because DDP needs every
  rank in every gradient all-reduce.
* Rank 0 reports. Its `FileHooks` append progress and metrics as JSON lines to a file that the
  launcher tails into the caller's hooks; the other ranks report nothing.
* One decision to stop. Rank 0 asks its hooks (the stop file the launcher writes on cancel, or the
  launcher gone) and broadcasts the answer, so all ranks leave the loop at the same step.
* Rank 0 writes checkpoints and the output model; every rank loads the same checkpoint on resume,
  so a resumed run continues exactly as a one-process one does.

`launch` is the parent side: it starts torchrun in a process group of its own, relays the events,
asks the ranks to stop when the caller's `should_stop()` turns true (terminating the whole group
after a grace period if they do not), and returns the trainer's result or raises `Cancelled`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.ml.hooks import Cancelled, Hooks, NullHooks

T = TypeVar("T")

# The trainers that run under torchrun: kind -> "module:function". Each takes `ranks=`.
TRAINERS = {
    "reward": "app.ml.reward:train_reward_model",
    "dpo": "app.ml.dpo:train_dpo",
    "ppo": "app.ml.ppo:train_ppo",
}
# After a stop request, how long the ranks get to checkpoint and end before the group is
# terminated, and how long after that before it is killed.
STOP_GRACE_S = 60.0
KILL_AFTER_S = 10.0


# ---------------------------------------------------------------------------------------------
# Inside a rank: the process group, sharding, collectives
# ---------------------------------------------------------------------------------------------


def backend_for(cuda: bool | None = None) -> str:
    """The collective backend: `nccl` between GPUs, `gloo` between CPU processes."""
    return "nccl" if (torch.cuda.is_available() if cuda is None else cuda) else "gloo"


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank `rank`'s contiguous part of `items`; sizes differ by at most one, lower ranks first.

    Contiguous, so the ranks' parts concatenated in rank order are `items` again: gathered
    per-example values come back in the one-process order."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group, and the few collectives the trainers use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, checkpoints and saves."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of a global batch (`shard`)."""
        return shard(items, self.rank, self.world_size)

    def wrap(self, module: nn.Module, ignore: Collection[str] = ()) -> DistributedDataParallel:
        """`module` under DDP (which broadcasts rank 0's weights, so every rank starts alike).

        `ignore` names parameters DDP must leave alone: ones whose gradient does not come
        through autograd (`app.ml.vocab_grads`), which the trainer then reduces itself."""
        if ignore:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, list(ignore)
            )
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Each tensor replaced, in place, by its mean over the ranks (same order everywhere)."""
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (any picklable object), in rank order."""
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def should_stop(self, hooks: Hooks) -> bool:
        """Rank 0's `hooks.should_stop()`, the same answer on every rank."""
        flag = torch.tensor([int(self.is_main and hooks.should_stop())], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (per-example sums of a step's metrics)."""
        names = sorted(values)
        tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(names, tensor.tolist(), strict=True))

    def cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (1-D, any length) concatenated in rank order, on this device."""
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, tensor.detach().cpu())
        return torch.cat(parts).to(tensor.device)

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote a file the others may read)."""
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def init_ranks() -> Ranks:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK in the env)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {local_rank} has no GPU: this worker sees {torch.cuda.device_count()}"
                " (CUDA_VISIBLE_DEVICES); num_processes must not exceed the GPUs it sees"
            )
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(cuda))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, device)


# ---------------------------------------------------------------------------------------------
# Between the launcher and rank 0: files in one private directory
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchFiles:
    """The files of one launch: what to train, what happened, the stop request, the outcome."""

    root: Path

    @property
    def payload(self) -> Path:
        return self.root / "payload.pkl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def stop(self) -> Path:
        return self.root / "stop"

    @property
    def result(self) -> Path:
        return self.root / "result.pkl"

    @property
    def log(self) -> Path:
        return self.root / "torchrun.log"


def _write_pickle(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(value))
    os.replace(tmp, path)


def _read_pickle(path: Path) -> Any:
    # Our own file, written moments ago by this launch in its private directory.
    return pickle.loads(path.read_bytes())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileHooks:
    """Rank 0's hooks: events as JSON lines for the launcher; stop when it asks or is gone."""

    def __init__(self, files: LaunchFiles, launcher_pid: int) -> None:
        self.files = files
        self.launcher_pid = launcher_pid
        self._out = files.events.open("a", encoding="utf-8")

    def _emit(self, event: dict[str, Any]) -> None:
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        """Append a progress event."""
        self._emit({"type": "progress", "done": done, "total": total, "message": message})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Append a metrics event (NaN and inf survive: Python's JSON writes them)."""
        self._emit({"type": "metrics", "step": step, "values": values})

    def should_stop(self) -> bool:
        """The launcher wrote the stop file, or died (a worker killed outright)."""
        return self.files.stop.exists() or not _alive(self.launcher_pid)

    def close(self) -> None:
        self._out.close()


def _trainer(kind: str) -> Callable[..., Any]:
    module, _, name = TRAINERS[kind].partition(":")
    train: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return train


def main(argv: Sequence[str] | None = None) -> int:
    """The torchrun entry point: `python -m app.ml.distributed LAUNCH_DIR` on every rank."""
    files = LaunchFiles(Path((argv if argv is not None else sys.argv[1:])[0]))
    payload = _read_pickle(files.payload)
    ranks = init_ranks()
    hooks: Hooks = FileHooks(files, payload["launcher_pid"]) if ranks.is_main else NullHooks()
    outcome: dict[str, Any]
    status = 0
    try:
        result = _trainer(payload["kind"])(**payload["kwargs"], hooks=hooks, ranks=ranks)
        outcome = {"status": "succeeded", "result": result}
    except Cancelled as exc:
        # Exit 0: a non-zero exit makes torchrun kill the other ranks, maybe mid-checkpoint.
        outcome = {"status": "cancelled", "message": str(exc)}
    except Exception as exc:
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
        status = 1
    if ranks.is_main:
        _write_pickle(files.result, outcome)
    if isinstance(hooks, FileHooks):
        hooks.close()
    if status == 0:
        dist.destroy_process_group()
    return status


# ---------------------------------------------------------------------------------------------
# The launcher: torchrun as a child process group
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on localhost now, for torchrun's rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun_command(launch_dir: Path, num_processes: int, port: int) -> list[str]:
    """The command line that starts `num_processes` ranks of this module on this host."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(num_processes),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "app.ml.distributed", str(launch_dir),
    ]  # fmt: skip


class _EventTail:
    """Reads the complete lines rank 0 appended since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(row) for row in data[:end].splitlines() if row.strip()]


def _relay(events: list[dict[str, Any]], hooks: Hooks) -> None:
    for event in events:
        if event["type"] == "progress":
            hooks.progress(event["done"], event["total"], event["message"])
        elif event["type"] == "metrics":
            hooks.metrics(event["step"], event["values"])


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group already ended
        os.killpg(proc.pid, sig)


def launch(
    kind: str,
    kwargs: dict[str, Any],
    num_processes: int,
    launch_dir: Path,
    hooks: Hooks | None = None,
    *,
    stop_grace_s: float = STOP_GRACE_S,
    kill_after_s: float = KILL_AFTER_S,
    on_start: Callable[[int], None] | None = None,
    poll_s: float = 0.2,
) -> Any:
    """Train `kind` (a `TRAINERS` key) with `kwargs` in `num_processes` torchrun ranks.

    Returns what the trainer returned on rank 0. Progress and metrics reach `hooks`; when
    `hooks.should_stop()` turns true the ranks are asked to stop (they checkpoint and end, and
    `Cancelled` is raised); ranks that have not ended `stop_grace_s` later are terminated as a
    whole process group, SIGKILLed after `kill_after_s` more. `on_start` gets torchrun's pid.
    """
    hooks = hooks or NullHooks()
    if hooks.should_stop():  # e.g. a worker already shutting down: start nothing
        raise Cancelled(f"{kind} training stopped before it started")
    files = LaunchFiles(launch_dir)
    launch_dir.mkdir(parents=True, exist_ok=True)
    for stale in (files.events, files.stop, files.result):
        stale.unlink(missing_ok=True)
    _write_pickle(files.payload, {"kind": kind, "kwargs": kwargs, "launcher_pid": os.getpid()})
    env = dict(os.environ)
    # Each rank gets the threads this process trains with (torchrun would otherwise pick 1).
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env["PYTHONUNBUFFERED"] = "1"
    command = torchrun_command(launch_dir, num_processes, free_port())
    with files.log.open("ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    if on_start is not None:
        on_start(proc.pid)
    tail = _EventTail(files.events)
    asked_at: float | None = None
    terminated_at: float | None = None
    try:
        while proc.poll() is None:
            _relay(tail.read(), hooks)
            now = time.monotonic()
            if asked_at is None and hooks.should_stop():
                files.stop.touch()
                asked_at = now
            elif asked_at is not None and terminated_at is None and now - asked_at > stop_grace_s:
                _signal_group(proc, signal.SIGTERM)
                terminated_at = now
            elif terminated_at is not None and now - terminated_at > kill_after_s:
                _signal_group(proc, signal.SIGKILL)
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # the caller itself was interrupted: take the ranks with it
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        # Ranks torchrun started may outlive it for a moment: none may outlive the launch.
        _signal_group(proc, signal.SIGKILL)
    _relay(tail.read(), hooks)
    outcome = _read_pickle(files.result) if files.result.exists() else None
    if outcome is not None and outcome["status"] == "succeeded":
        return outcome["result"]
    if outcome is not None and outcome["status"] == "cancelled":
        raise Cancelled(outcome["message"])
    if asked_at is not None:
        raise Cancelled(f"{kind} training stopped (the processes were terminated)")
    error = outcome["error"] if outcome is not None else f"torchrun exited with {proc.returncode}"
    log_tail = files.log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{kind} training in {num_processes} processes failed: {error}\n{log_tail}")


if __name__ == "__main__":
    sys.exit(main())
