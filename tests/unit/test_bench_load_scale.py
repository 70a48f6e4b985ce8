"""bench/load.py and bench/scale.py still run, and what they check holds, on tiny settings.

No timings are asserted (those are in docs/benchmarks.md); what is asserted is what must hold
at any speed: no judgment lost or duplicated under concurrent raters, every invariant check at
0, and no sequential scan of a growing table in the hot path's plans.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def run_bench(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("client", ["httpx", "raw"])
def test_load_bench_loses_and_duplicates_nothing(pg_url: str, client: str) -> None:
    out = run_bench(
        "bench/load.py", "--raters", "6", "--saturate-raters", "4", "--rates", "20",
        "--duration", "2", "--warmup", "1", "--think-s", "0.05", "--pairs", "200",
        "--client", client,
    )  # fmt: skip
    checks = next(line for line in out.splitlines() if line.startswith("- invariant checks"))
    counts = [int(part.rsplit(":", 1)[1]) for part in checks.split("):", 1)[1].split(";")]
    assert len(counts) == 9 and counts == [0] * 9, checks
    assert "zero lost or duplicated judgments met" in out
    assert "errors (non-2xx, transport) by status: none" in out


def test_scale_bench_plans_use_indexes(pg_url: str) -> None:
    out = run_bench(
        "bench/scale.py", "--divide", "20", "--rounds", "1", "--seconds", "2", "--warmup", "1",
    )  # fmt: skip
    assert "sequential scans on the tables that grow with the data" in out
    assert "): **0**" in out, out[-3000:]
    assert "ix_assignments_rater_history" in out and "ix_judgments_rater_history" in out
