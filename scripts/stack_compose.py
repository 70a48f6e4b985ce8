"""docker-compose.yml read as data, for the two things that must agree with it without Docker:
the compose test (tests/unit/test_compose.py: every command, option, setting and target is
real) and `make stack-smoke` (scripts/stack_smoke.py: runs the same commands as local
processes). Both read the file through this module, so neither can drift from it.

Only the part of the Compose specification that the file uses is implemented: YAML merge keys
(PyYAML's loader resolves `<<:`), variable interpolation in string values (`${VAR}`,
`${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `$$` for a literal
`$`), `command` and healthcheck `test` as a string or a list, `environment` as a mapping or a
list of `NAME=value`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"

# `$$`, `$NAME`, or `${NAME}` with an optional `:-`, `-`, `:?` or `?` and its word.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<word>[^}]*))?\})"
)
_FROM_AS = re.compile(r"^\s*FROM\s+\S+\s+AS\s+(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset (or empty): compose refuses to start."""


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as plain data, merge keys resolved, nothing interpolated yet."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ValueError(f"{path} has no services mapping")
    return data


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` with its variables replaced as `docker compose` replaces them."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["braced"]
        op, word = match["op"], match["word"] or ""
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {word or 'required'}")
        if op in (":-", "-") and unset:
            return word
        return current or ""

    return _VARIABLE.sub(replace, value)


def interpolate_tree(value: Any, env: Mapping[str, str]) -> Any:
    """Every string inside `value` (mappings, lists) interpolated; keys stay as written."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, dict):
        return {key: interpolate_tree(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_tree(item, env) for item in value]
    return value


def variables(text: str) -> dict[str, str | None]:
    """Every variable the text refers to, with its operator (None for a plain `${VAR}`)."""
    found: dict[str, str | None] = {}
    for match in _VARIABLE.finditer(text):
        name = match["bare"] or match["braced"]
        if name:
            found[name] = found.get(name) or match["op"]
    return found


def required_variables(text: str) -> set[str]:
    """The variables compose refuses to start without (`${VAR:?...}` or `${VAR?...}`)."""
    return {name for name, op in variables(text).items() if op in (":?", "?")}


def as_argv(command: str | list[str]) -> list[str]:
    """A `command` (a string is split as a shell would, without running one) as argv."""
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def healthcheck_argv(test: str | list[str]) -> list[str]:
    """A healthcheck `test` as argv: `CMD` forms as they are, `CMD-SHELL` (or a plain string)
    split as the shell would split it."""
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = test
    if kind == "CMD-SHELL":
        return shlex.split(rest[0])
    if kind == "CMD":
        return [str(part) for part in rest]
    return []  # NONE: the image's healthcheck is disabled


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment` as a mapping (a list of NAME=value is accepted too)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.partition("=") for item in raw)
        return {name: value for name, _, value in pairs}
    return {str(name): "" if value is None else str(value) for name, value in raw.items()}


def option_value(argv: list[str], *names: str) -> str | None:
    """The value of the last `--name value` / `--name=value` / `-Xvalue` in argv, or None."""
    found = None
    for i, token in enumerate(argv):
        for name in names:
            if token == name and i + 1 < len(argv):
                found = argv[i + 1]
            elif token.startswith(name + "=") and name.startswith("--"):
                found = token[len(name) + 1 :]
    return found


def with_option(argv: list[str], name: str, value: str) -> list[str]:
    """argv with option `name` set to `value` (replaced where it is, else appended)."""
    out, i, replaced = [], 0, False
    while i < len(argv):
        token = argv[i]
        if token == name and i + 1 < len(argv):
            out += [name, value]
            i += 2
            replaced = True
            continue
        if token.startswith(name + "="):
            out.append(f"{name}={value}")
            replaced = True
        else:
            out.append(token)
        i += 1
    return out if replaced else [*out, name, value]


def dockerfile_targets(path: Path = DOCKERFILE) -> set[str]:
    """The stage names of the Dockerfile (`FROM image AS name`), which `build.target` selects."""
    return set(_FROM_AS.findall(path.read_text()))


def build_target(service: Mapping[str, Any]) -> str | None:
    """The Dockerfile target a service builds (None when it only pulls an image)."""
    build = service.get("build")
    return build.get("target") if isinstance(build, dict) else None


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """The services this one waits for, with the condition (list form: `service_started`)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def env_example_names(path: Path = ENV_EXAMPLE) -> set[str]:
    """The variables `.env.example` lists (`NAME=` lines, commented out or not)."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE))
