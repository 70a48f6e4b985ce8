"""Run kinds and their knobs: torch-free definitions every layer reads.

`registry.RUN_KINDS` lists every kind of run; `knobs` is how a knob is defined; one module per
algorithm (`generate`, `reward`, `ppo`, `dpo`, `evaluate`, `interactive`) holds its knobs, its
trainer's config and its run's config; `data` holds what training runs read; `queues` names the
worker queues. Nothing here imports torch, the database or the web app, so the trainers in
`app.ml`, the services, the API, the CLI and the console all read the same definitions.
"""
