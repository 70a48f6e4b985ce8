"""How long-running ML code talks to whoever runs it, without knowing who that is.

`app.ml` never imports the database or Celery. A worker task passes an object with these three
methods; tests pass `NullHooks` or a recording fake.
"""

from __future__ import annotations

from typing import Protocol


class Cancelled(Exception):
    """Raised by ML code between steps when `Hooks.should_stop()` turned true."""


class Hooks(Protocol):
    """What a long-running `app.ml` function reports to, and asks, whoever runs it."""

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        """Report work done so far (and a log line), at most every step."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Record namespaced scalar metrics (`loss/value`, `objective/kl`, ...) at a step."""

    def should_stop(self) -> bool:
        """True when the run was cancelled; the caller raises `Cancelled` at a safe point."""


class NullHooks:
    """Hooks that listen to nothing and never stop a run."""

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        """Ignore the progress report."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Ignore the metrics."""

    def should_stop(self) -> bool:
        """Never: the run goes to its end."""
        return False


class RecordingHooks:
    """Keeps everything it is told; for tests and for benchmarks that print a summary."""

    def __init__(self, stop_after_progress: int | None = None) -> None:
        self.progress_calls: list[tuple[int, int | None, str]] = []
        self.metric_calls: list[tuple[int, dict[str, float]]] = []
        self.stop_after_progress = stop_after_progress

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        """Keep the progress report."""
        self.progress_calls.append((done, total, message))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Keep a copy of the metrics."""
        self.metric_calls.append((step, dict(values)))

    def should_stop(self) -> bool:
        """True once `stop_after_progress` progress reports came in (never when it is None)."""
        return (
            self.stop_after_progress is not None
            and len(self.progress_calls) >= self.stop_after_progress
        )

    def series(self, name: str) -> list[float]:
        """Every recorded value of metric `name`, in order."""
        return [values[name] for _, values in self.metric_calls if name in values]
