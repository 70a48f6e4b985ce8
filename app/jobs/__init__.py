"""The worker side of every run kind: one module per kind, plus the runner.

`app.jobs.runner` claims a run, keeps its heartbeat, hands the kind's handler a `RunContext`,
records how it ended, and recovers runs whose worker died or whose message was lost. Each kind's
module (`generate`, `reward`, `ppo`, `dpo`, `evaluate`, `interactive`) loads what it needs
through `app.services`, calls `app.ml` with plain data, and records progress, metrics,
artifacts and the result. Only the Celery tasks in `workers/` (and the tests of jobs) import
this package: it is where torch gets imported, and the web process never does.
"""
