"""What any stored value must satisfy, whichever way it arrived (JSON body, JSONL or CSV upload,
preference import): rules the databases or the API would otherwise enforce with a 500.

- No NUL character and no lone surrogate in any string, keys included: PostgreSQL's `text` and
  `jsonb` refuse NUL ("text fields cannot contain NUL"), and a lone surrogate cannot be encoded
  as UTF-8 to store or to send back.
- JSON nested at most `MAX_DEPTH` levels: Python's parser raises RecursionError near 1,000
  levels, and the API's serializer refuses to write back what is nested too deeply, so a deeper
  value that was stored would make every later listing of it fail.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Containers (objects and arrays) inside one another, counting the outermost one as 1.
MAX_DEPTH = 64
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


class NestedTooDeep(ValueError):
    """A JSON document nested more than `MAX_DEPTH` levels."""

    def __init__(self) -> None:
        super().__init__(f"nested more than {MAX_DEPTH} levels deep")


def loads(text: str | bytes, envelope: int = 0) -> Any:
    """`json.loads`, refusing documents nested more than `MAX_DEPTH` levels (NestedTooDeep)
    before Python's recursion limit turns them into a RecursionError. `envelope` is how many
    levels of the document wrap its records (the API body's `{"prompts": [...]}` is 2), so a
    record may be nested as deeply whichever way it arrives."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise NestedTooDeep() from exc
    if depth_exceeds(value, MAX_DEPTH + envelope):
        raise NestedTooDeep()
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` holds containers nested more than `limit` deep (iterative: no
    recursion, whatever the depth)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def string_problem(value: str) -> str | None:
    """Why the databases would refuse this string, or None."""
    found = _BAD_CHARS.search(value)
    if found is None:
        return None
    where = f"at character {found.start() + 1}"
    if found.group() == "\x00":
        return f"contains a NUL character ({where})"
    return f"contains a lone surrogate U+{ord(found.group()):04X} ({where})"


def value_problem(value: Any) -> str | None:
    """Why a JSON value (its strings, keys included, and its depth) cannot be stored, or None."""
    if depth_exceeds(value, MAX_DEPTH):
        return f"nested more than {MAX_DEPTH} levels deep"
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if (problem := string_problem(item)) is not None:
                return problem
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and (problem := string_problem(key)) is not None:
                    return f"key {key[:40]!r} {problem}"
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return None
