"""Where every benchmark writes its figures: its own `## Heading` section of docs/benchmarks.md.

Each benchmark script imports this module from its own directory (`python bench/x.py` puts
`bench/` first on `sys.path`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(heading: str, text: str) -> None:
    """Replace the section that starts at the line `heading` (up to the next `## ` heading) with
    `text`, or append it; the other sections stay as they are. Written atomically."""
    if not text.startswith(heading + "\n"):
        raise ValueError(f"a section must start with its heading {heading!r}")
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = text.rstrip("\n") + "\n"
    if pattern.search(current):
        updated = pattern.sub(lambda _: section + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=DOCS.parent, prefix=".benchmarks.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(updated.rstrip("\n") + "\n")
    os.replace(tmp, DOCS)
