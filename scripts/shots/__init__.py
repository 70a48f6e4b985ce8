"""The console's pages to photograph, one module per area (see scripts/screenshots.py).

Each module has `PAGES: list[Shot]` and, if its pages need rows of their own, a
`seed(session, ids)` that adds them (and may add ids for its paths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Shot:
    """One page to photograph: its file name, its path (or a function of the seeded ids), and
    what to do on the page before the picture (open a dialog, fill a form)."""

    name: str
    path: str | Callable[[dict[str, Any]], str]
    before: Callable[[Any], None] | None = None
    full_page: bool = True
