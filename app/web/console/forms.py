"""Forms generated from a definition: a knob class (a run kind's config) or the project settings.

    knob_table(model) ──fields()──► template (templates/console/_form_fields.html)
    submitted form ──parse()──► dict ──the service validates──► field errors back at their field

The fields come from the same JSON schema the services validate against (`app.kinds.knobs`), so
a new knob or setting appears in its form at once, with its default, bounds and help; the
browser refuses a value outside the bounds before it is sent (`min`, `max`, `step`, `required`),
and the service refuses it again, at the field, if it gets through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import FormData

from app.kinds.knobs import knob_table
from app.services.errors import FieldError


@dataclass
class FormField:
    """One input of a generated form."""

    name: str  # the knob's name; nested knobs are "data.ties"
    label: str
    widget: str  # "number", "checkbox", "select", "text", "json"
    help: str
    value: Any  # what the input shows: the submitted value, else the default
    default: Any
    nullable: bool = False
    choices: list[str] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    step: str = "any"
    error: str = ""

    @property
    def input_id(self) -> str:
        return "f-" + self.name.replace(".", "-")

    @property
    def bounds(self) -> str:
        """The bounds in words, for the help line: '≥ 1, ≤ 4096'."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '≥'} {_plain(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '≤'} {_plain(self.maximum)}")
        return ", ".join(parts)


def fields(
    model: type[BaseModel],
    values: dict[str, Any] | None = None,
    errors: list[FieldError] | None = None,
    *,
    prefix: str = "",
    skip: frozenset[str] = frozenset(),
    error_prefix: str = "config.",
) -> list[FormField]:
    """The form fields of `model`'s knobs, showing `values` where given (else the defaults) and
    each error of `errors` (named like `config.batch_size`) at its field."""
    values = values or {}
    by_field = {
        (e.field or "").removeprefix(error_prefix): e.message for e in (errors or []) if e.field
    }
    out: list[FormField] = []
    for row in knob_table(model):
        name = row["name"]
        if name in skip:
            continue
        full = f"{prefix}{name}"
        kind = row["type"]
        widget = {"integer": "number", "number": "number", "boolean": "checkbox"}.get(kind, "text")
        if row["choices"]:
            widget = "select"
        elif kind in ("object", "array") or " | " in kind:
            widget = "json"
        value = values.get(name, row["default"])
        out.append(
            FormField(
                name=full,
                label=label_of(name),
                widget=widget,
                help=row["help"],
                value=_shown(value, widget),
                default=row["default"],
                nullable=row["nullable"],
                choices=[str(c) for c in row["choices"] or []],
                minimum=row["minimum"],
                maximum=row["maximum"],
                exclusive_minimum=row["exclusive_minimum"],
                exclusive_maximum=row["exclusive_maximum"],
                step="1" if kind == "integer" else "any",
                error=by_field.get(full, ""),
            )
        )
    return out


def parse(form: FormData, model: type[BaseModel], *, prefix: str = "") -> dict[str, Any]:
    """The submitted values of `model`'s fields as the types the definition expects; an empty
    input of a nullable field is None, an empty one of another field is left out (its default
    applies). What does not parse is passed on as given, for the service to refuse at the field."""
    out: dict[str, Any] = {}
    for row in knob_table(model):
        name = row["name"]
        key = f"{prefix}{name}"
        kind = row["type"]
        if kind == "boolean":
            if f"{key}.present" in form:  # the checkbox's hidden twin: the field was on the form
                out[name] = key in form
            continue
        if key not in form:
            continue
        raw = str(form.get(key, "")).strip()
        if raw == "":
            if row["nullable"]:
                out[name] = None
            continue
        out[name] = _typed(raw, kind, bool(row["choices"]))
    return out


def label_of(name: str) -> str:
    """A knob's name as a label: `lease_ttl_s` -> "lease ttl (s)", `max_new_tokens` -> "max new
    tokens"."""
    words = name.split("_")
    unit = {"s": "(s)", "ms": "(ms)"}.get(words[-1]) if len(words) > 1 else None
    return " ".join(words[:-1] + [unit] if unit else words)


def _typed(raw: str, kind: str, choice: bool) -> Any:
    try:
        if choice:
            return raw
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
        if kind in ("object", "array") or " | " in kind:
            return json.loads(raw)
    except ValueError:
        return raw
    return raw


def _shown(value: Any, widget: str) -> Any:
    if widget == "json":
        return "" if value is None else json.dumps(value)
    if value is None:
        return ""
    return value


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)
