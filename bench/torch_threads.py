"""Torch threads per worker: decode-shaped matmuls at 1 and 2 intra-op threads, idle and loaded.

    .venv/bin/python bench/torch_threads.py            # both thread counts, idle and loaded

A decode step of SmolLM2-135M multiplies a few rows (the batch's sequences) by its weights;
this times 200 MLP passes (rows x 576 @ 576 x 1536 @ 1536 x 576) at 4, 8 and 16 rows, median of
5 repeats, in a fresh process per setting. "loaded" runs one busy-looping process per core
beside it, as a web server and a second worker would on a small host. The figures behind the
default `VERDICT_TORCH_THREADS=1` are in docs/operations.md ("Worker sizing").
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from multiprocessing.synchronize import Event

ROWS = (4, 8, 16)
REPS = 200


def _busy(stop: Event) -> None:
    while not stop.is_set():
        sum(range(100_000))


def _measure(threads: int, rows: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x, w1, w2 = torch.randn(rows, 576), torch.randn(576, 1536), torch.randn(1536, 576)
    for _ in range(20):
        (x @ w1) @ w2
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(REPS):
            (x @ w1) @ w2
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _one(threads: int, loaded: bool) -> None:
    stop = mp.Event()
    hogs = [mp.Process(target=_busy, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    if loaded:
        for hog in hogs:
            hog.start()
        time.sleep(0.5)
    try:
        figures = ", ".join(f"{rows} rows {_measure(threads, rows):.0f} ms" for rows in ROWS)
    finally:
        stop.set()
        for hog in hogs if loaded else ():
            hog.join()
    print(f"{threads} thread(s), {'loaded' if loaded else 'idle'}: {figures}", flush=True)


def main() -> None:
    if len(sys.argv) == 3:
        _one(int(sys.argv[1]), sys.argv[2] == "loaded")
        return
    print(f"{os.cpu_count()} cores; {REPS} MLP passes per figure (median of 5)")
    for mode in ("idle", "loaded"):
        for threads in (2, 1):
            subprocess.run([sys.executable, __file__, str(threads), mode], check=True)


if __name__ == "__main__":
    main()
