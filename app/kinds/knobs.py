"""One definition per knob: its name, type, default, bounds and help text, torch-free.

A knob class is a pydantic model. The trainer in `app.ml` reads its fields; the services validate
a run's `config` against it (a bad value is refused at its field, with its bounds in the message);
the OpenAPI schema, `verdict runs knobs KIND` and the console's launch forms are all generated
from it. A new knob is one line here and appears everywhere at once.

Three layers per algorithm keep every field written once:

    XKnobs       what a person tunes (learning rate, batch size, ...)
    XConfig      XKnobs + where it runs (device, dtype, resolved paths): what the trainer takes
    XRunConfig   XKnobs + which data a run uses; its defaults may differ from the trainer's for
                 a CPU worker, each such difference declared with `same_knob(..., default=...)`
"""

from __future__ import annotations

from typing import Any, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.fields import FieldInfo

K = TypeVar("K", bound=BaseModel)

# Fields of a trainer config that the worker sets from where it runs; a run's config never
# carries them (a test checks that every other trainer field is reachable from a run's config).
PLACEMENT_FIELDS = frozenset({"device", "dtype", "backbone", "value_model_path"})


class Knobs(BaseModel):
    """Base of every knob class: unknown keys are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored with runs, in checkpoints and next to output models)."""
        return self.model_dump(mode="json")


def knob(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A knob's whole definition: default, bounds and the help text every surface shows."""
    if isinstance(default, list | dict):
        value = default
        return Field(default_factory=lambda: type(value)(value), description=help)
    return Field(default, description=help, ge=ge, gt=gt, le=le, lt=lt)


def must_divide(field: str, total: str) -> Any:
    """A validator (assign it in the class body) refusing a `field` that does not divide
    `total`, at `field`, naming both: `mini_batch_size` must divide `batch_size`."""

    def check(cls: type[BaseModel], value: int, info: ValidationInfo) -> int:
        whole = info.data.get(total)
        if whole is not None and whole % value:
            raise ValueError(f"must divide {total} ({whole})")
        return value

    return field_validator(field)(check)


def same_knob(owner: type[BaseModel], name: str, *, note: str = "", **changes: Any) -> Any:
    """`owner`'s knob `name` (its bounds and help), reused here with `changes` declared.

    This is how a run config states that its default differs from the trainer's, or how a
    project setting reuses a sampling knob, without a second copy of the definition.
    """
    info = owner.model_fields[name]
    if note:
        changes["description"] = f"{info.description} ({note})"
    lower = {k: changes.pop(k) for k in ("ge", "gt") if k in changes}
    upper = {k: changes.pop(k) for k in ("le", "lt") if k in changes}
    merged = FieldInfo.merge_field_infos(info, **changes)
    # A new lower (upper) bound replaces the old one, whichever of ge/gt (le/lt) that was.
    replaced = (*((Ge, Gt) if lower else ()), *((Le, Lt) if upper else ()))
    merged.metadata = [m for m in merged.metadata if not isinstance(m, replaced)]
    bounds: dict[str, type[Ge | Gt | Le | Lt]] = {"ge": Ge, "gt": Gt, "le": Le, "lt": Lt}
    merged.metadata += [bounds[key](value) for key, value in (lower | upper).items()]
    return merged


def num_processes_knob(*, le: int = 64, note: str = "") -> Any:
    """A run config's `num_processes`: how many training processes (one per GPU) its job starts.

    Not a trainer knob: the trainer learns its rank and world size from `torch.distributed`, and
    with the batch size global the trajectory does not depend on it (`app.ml.distributed`)."""
    help = (
        "Training processes on the worker's host, one per GPU (CPU: gloo). Above 1 the job"
        " launches torchrun and trains under DistributedDataParallel; batch_size stays the"
        " global batch, split across the processes."
    )
    return Field(1, ge=1, le=le, description=f"{help} {note}".strip())


def knobs_of(config: BaseModel, knobs: type[BaseModel]) -> dict[str, Any]:
    """The values of `knobs`' fields in `config`: a run config's knobs, for its trainer."""
    return config.model_dump(include=set(knobs.model_fields))


def knob_table(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Every field of a knob class as a row (name, type, default, bounds, choices, help).

    What the CLI prints and the console's forms render; read from the JSON schema pydantic
    validates against, so the table cannot drift from the validation.
    """
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    rows = []
    for name, prop in schema.get("properties", {}).items():
        info = model.model_fields[name]
        rows.append(
            {
                "name": name,
                "type": _type_name(prop, defs),
                "nullable": _nullable(prop),
                "default": None if info.is_required() else _plain_default(info),
                "required": info.is_required(),
                "minimum": _first(prop, "minimum", "exclusiveMinimum"),
                "maximum": _first(prop, "maximum", "exclusiveMaximum"),
                "exclusive_minimum": "exclusiveMinimum" in _flat(prop),
                "exclusive_maximum": "exclusiveMaximum" in _flat(prop),
                "choices": _flat(prop).get("enum"),
                "help": info.description or "",
            }
        )
    return rows


def _flat(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an `anyOf: [X, null]` property (or the property itself)."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    return branches[0] if len(branches) == 1 else prop


def _nullable(prop: dict[str, Any]) -> bool:
    return any(b.get("type") == "null" for b in prop.get("anyOf", []))


def _type_name(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    flat = _flat(prop)
    if "$ref" in flat:
        return "object"
    if "enum" in flat or "const" in flat:
        return "choice"
    if "anyOf" in flat:
        return " | ".join(b.get("type", "object") for b in flat["anyOf"])
    return str(flat.get("type", "object"))


def _first(prop: dict[str, Any], *keys: str) -> Any:
    flat = _flat(prop)
    for key in keys:
        if key in flat:
            return flat[key]
    return None


def _plain_default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return info.default
