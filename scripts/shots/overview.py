"""The console's start page and its error page."""

from __future__ import annotations

from shots import Shot

PAGES = [
    Shot("console-overview", "/admin"),
    Shot("error-404", "/admin/no-such-page"),
]
