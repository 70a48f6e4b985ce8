"""Worker sizing: torch's thread pools follow `torch_threads`, and `verdict worker` names its
node after its queues, so two workers of different queues on one host never share a name (the
real workers: tests/workers/test_presence.py)."""

from __future__ import annotations

import subprocess
import sys

from app.cli_runs import default_node_name, worker_argv
from app.core.config import ROOT_DIR


def test_default_node_names_follow_the_queues() -> None:
    assert default_node_name("gpu") == "gpu@%h"
    assert default_node_name("default") == "default@%h"
    assert default_node_name("gpu,default") == "gpu-default@%h"
    assert default_node_name(" gpu , default ") == "gpu-default@%h"
    assert default_node_name("gpu") != default_node_name("default")


def test_the_worker_command_line_keeps_name_and_queues() -> None:
    argv = worker_argv("default", pool="solo", concurrency=1, name=None, loglevel="info")
    assert argv[argv.index("-n") + 1] == "default@%h"
    assert argv[argv.index("-Q") + 1] == "default" and "--pool=solo" in argv
    named = worker_argv("gpu", pool="solo", concurrency=1, name="gpu1@%h", loglevel="info")
    assert named[named.index("-n") + 1] == "gpu1@%h"


def _in_fresh_process(code: str, env_threads: str | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if env_threads is not None:
        env["VERDICT_TORCH_THREADS"] = env_threads
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT_DIR, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_torch_threads_before_and_after_torch_is_imported() -> None:
    # At worker start torch is not imported yet: the environment sizes it when it is.
    out = _in_fresh_process(
        "import os, sys\n"
        "from workers.celery_app import apply_torch_threads, size_torch\n"
        "apply_torch_threads(2)\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n"
        # Before a run: both pools set explicitly.
        "size_torch(1)\n"
        "print(torch.get_num_threads(), torch.get_num_interop_threads())\n"
    )
    assert out.splitlines() == ["2 2", "1 1"]


def test_the_setting_reaches_the_worker_start_signal() -> None:
    out = _in_fresh_process(
        "import torch\n"
        "from workers.celery_app import _size_threads_at_start\n"
        "_size_threads_at_start()\n"
        "print(torch.get_num_threads())\n",
        env_threads="3",
    )
    assert out == "3"
