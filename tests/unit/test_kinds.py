"""The registry of run kinds is the one definition: the migrated database's CHECK constraint,
the API's accepted kinds and schemas, and the CLI agree with it; every knob is documented and
every trainer knob is reachable from a run's config."""

from __future__ import annotations

import importlib
import re
import subprocess

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.core.config import ROOT_DIR
from app.kinds.dpo import DPOConfig, DPOKnobs, DPORunConfig
from app.kinds.evaluate import EvaluateRunConfig, EvaluationKnobs
from app.kinds.generate import GenerateRunConfig, SamplingConfig
from app.kinds.knobs import PLACEMENT_FIELDS, Knobs, knob_table
from app.kinds.ppo import PPOConfig, PPOKnobs, PPORunConfig
from app.kinds.queues import QUEUES
from app.kinds.registry import KIND_NAMES, LAUNCHABLE_KINDS, RUN_KINDS
from app.kinds.reward import RewardConfig, RewardKnobs, RewardRunConfig
from app.models import Run
from tests.conftest import engine_for, run_verdict

# (what the trainer takes, the knobs a person tunes, a run's config)
TRAINERS: list[tuple[type[BaseModel], type[BaseModel], type[BaseModel]]] = [
    (PPOConfig, PPOKnobs, PPORunConfig),
    (DPOConfig, DPOKnobs, DPORunConfig),
    (RewardConfig, RewardKnobs, RewardRunConfig),
    (EvaluationKnobs, EvaluationKnobs, EvaluateRunConfig),
]


def kinds_in(check: str) -> set[str]:
    return set(re.findall(r"'([a-z_]+)'", check))


def test_the_migrated_check_constraint_lists_exactly_the_registered_kinds(db_url: str) -> None:
    engine = engine_for(db_url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            check = conn.scalar(
                sa.text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conname = 'ck_runs_kind'"
                )
            )
        else:
            check = conn.scalar(sa.text("SELECT sql FROM sqlite_master WHERE name = 'runs'"))
            check = re.search(r"CONSTRAINT ck_runs_kind CHECK \((.*?)\)\s*(,|\))", check).group(1)
    assert kinds_in(str(check)) == set(KIND_NAMES)
    table = Run.__table__
    assert isinstance(table, sa.Table)
    (model_check,) = [
        c
        for c in table.constraints
        if isinstance(c, sa.CheckConstraint) and "kind IN" in str(c.sqltext)
    ]
    assert kinds_in(str(model_check.sqltext)) == set(KIND_NAMES)  # type: ignore[attr-defined]


def test_the_openapi_body_of_a_new_run_is_one_schema_per_launchable_kind(
    client: TestClient,
) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/projects/{slug}/runs"]["post"]["requestBody"]
    options = body["content"]["application/json"]["schema"]["oneOf"]
    assert [o["properties"]["kind"]["const"] for o in options] == list(LAUNCHABLE_KINDS)
    components = spec["components"]["schemas"]
    for option in options:
        kind = RUN_KINDS[option["properties"]["kind"]["const"]]
        ref = option["properties"]["config"]["$ref"].removeprefix("#/components/schemas/")
        schema = components[ref]
        assert set(schema["properties"]) == set(kind.config.model_fields)
        for name, field in kind.config.model_fields.items():
            assert schema["properties"][name].get("description") == field.description, name
    # An unknown kind is refused by name, and a knob outside its bounds at its field.
    assert "ppo" in LAUNCHABLE_KINDS and "score" not in LAUNCHABLE_KINDS


def test_every_kind_has_a_queue_a_handler_and_a_database_check() -> None:
    for kind in RUN_KINDS.values():
        assert kind.queue in QUEUES
        module, _, name = kind.handler.partition(":")
        assert module.startswith("app.jobs."), kind.handler
        assert callable(getattr(importlib.import_module(module), name)), kind.handler
        assert kind.validate is not None
        module, _, name = kind.validate.partition(":")
        assert module.startswith("app.services."), kind.validate
        assert callable(getattr(importlib.import_module(module), name)), kind.validate
        assert issubclass(kind.config, Knobs)


@pytest.mark.parametrize("model", sorted({k.config for k in RUN_KINDS.values()}, key=str))
def test_every_knob_of_every_run_config_says_what_it_does(model: type[BaseModel]) -> None:
    rows = knob_table(model)
    assert [r["name"] for r in rows] == list(model.model_fields)
    undocumented = [r["name"] for r in rows if not r["help"].strip()]
    assert undocumented == []


@pytest.mark.parametrize(("trainer", "knobs", "run"), TRAINERS, ids=lambda c: c.__name__)
def test_every_trainer_knob_is_reachable_from_a_run_config(
    trainer: type[BaseModel], knobs: type[BaseModel], run: type[BaseModel]
) -> None:
    # What the trainer takes beyond the knobs is where it runs, set by the worker.
    assert set(trainer.model_fields) - set(knobs.model_fields) <= PLACEMENT_FIELDS
    assert set(knobs.model_fields) <= set(run.model_fields)
    # A run config's field of a knob keeps the knob's type and help (its default may differ).
    for name in knobs.model_fields:
        assert run.model_fields[name].annotation == knobs.model_fields[name].annotation, name
        assert run.model_fields[name].description.startswith(  # type: ignore[union-attr]
            knobs.model_fields[name].description or ""
        ), name


def test_the_defaults_a_run_changes_are_declared_where_the_run_config_is() -> None:
    """A run's default that differs from the trainer's is a `same_knob(..., default=...)` line
    of the run config: this lists them, so a new difference is a visible change here too."""
    changed = {
        (run.__name__, name): (knobs.model_fields[name].default, field.default)
        for _, knobs, run in TRAINERS
        for name, field in run.model_fields.items()
        if name in knobs.model_fields and field.default != knobs.model_fields[name].default
    }
    assert changed == {
        ("PPORunConfig", "batch_size"): (16, 8),
        ("PPORunConfig", "mini_batch_size"): (8, 4),
        ("PPORunConfig", "ppo_epochs"): (4, 2),
        ("RewardRunConfig", "train_mode"): ("full", "last_n"),
        ("RewardRunConfig", "checkpoint_every"): (0, 50),
    }
    assert GenerateRunConfig.model_fields["batch_size"].default == (
        SamplingConfig.model_fields["batch_size"].default
    )


def test_the_cli_offers_the_launchable_kinds_and_their_knobs() -> None:
    def verdict(*args: str) -> subprocess.CompletedProcess[str]:
        return run_verdict(*args, cwd=ROOT_DIR, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})

    kinds = verdict("runs", "kinds")
    assert kinds.returncode == 0, kinds.stderr
    listed = {line.split("│")[1].strip() for line in kinds.stdout.splitlines() if "│" in line}
    listed.discard("")  # a wrapped row's continuation lines
    assert listed == set(LAUNCHABLE_KINDS)
    knobs = verdict("runs", "knobs", "ppo")
    assert knobs.returncode == 0, knobs.stderr
    names = {line.split("│")[1].strip() for line in knobs.stdout.splitlines() if "│" in line}
    names.discard("")
    assert names == set(PPORunConfig.model_fields)
    unknown = verdict("runs", "knobs", "train")
    assert unknown.returncode == 2
    assert "unknown run kind 'train'; use one of " + ", ".join(LAUNCHABLE_KINDS) in unknown.stderr
