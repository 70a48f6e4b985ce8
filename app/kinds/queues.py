"""The worker queues (plain names: the CLI reads them without importing anything else)."""

GPU_QUEUE = "gpu"  # model work: one solo worker per GPU (or the embedded default's CPU worker)
DEFAULT_QUEUE = "default"  # housekeeping: reaper, lease sweep, reward trigger
QUEUES = (GPU_QUEUE, DEFAULT_QUEUE)
# Set by `verdict worker --sole`: the worker is the only one consuming its queues, so a run of
# those queues still marked running when it starts was orphaned (the embedded default).
SOLE_WORKER_ENV = "VERDICT_WORKER_SOLE"
