"""A training job's trainer call, in this process or in `num_processes` torchrun ranks.

With `num_processes == 1` the trainer runs here, exactly as it always has. Above 1,
`app.ml.distributed.launch` starts torchrun on this worker's host (one rank per GPU, or gloo
processes on a CPU host) in a process group of its own, relays rank 0's progress and metrics
to the run's hooks, and on cancel or worker shutdown asks the ranks to checkpoint and stop —
terminating the whole group if they do not within the grace period — and raises `Cancelled`,
so the runner ends or requeues the run as it does for one process. The launch directory (the
payload, rank 0's event file, torchrun's log) is the run's own and is removed afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.jobs.runner import RunContext
from app.ml.distributed import TRAINERS, launch


def launch_dir(ctx: RunContext) -> Path:
    """Where this attempt's torchrun launch keeps its files (under the var directory)."""
    return Path(ctx.settings.var_dir) / "launches" / f"run-{ctx.run_id}-attempt-{ctx.attempt}"


def trainer_call(
    ctx: RunContext,
    kind: str,
    num_processes: int,
    trainer: Callable[..., Any],
    /,
    **kwargs: Any,
) -> Callable[[], Any]:
    """A thunk training `kind` with `kwargs` (and the run's hooks): `trainer(**kwargs)` here for
    one process, a torchrun launch of `app.ml.distributed.TRAINERS[kind]` for more."""
    if num_processes <= 1:
        return lambda: trainer(**kwargs, hooks=ctx.hooks)
    assert kind in TRAINERS, f"{kind} does not train in several processes"

    def in_processes() -> Any:
        where = launch_dir(ctx)
        ctx.log(f"training in {num_processes} processes (torchrun, DDP); files in {where}")
        try:
            return launch(
                kind,
                kwargs,
                num_processes,
                where,
                ctx.hooks,
                on_start=lambda pid: ctx.log(f"torchrun started (pid {pid})"),
            )
        finally:
            shutil.rmtree(where, ignore_errors=True)

    return in_processes
