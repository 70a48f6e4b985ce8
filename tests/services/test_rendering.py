"""Markdown rendering of untrusted text: useful formatting survives, nothing active does."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from app.services.rendering import render_markdown, sanitize

XSS = [
    "<script>window.pwned=1</script>",
    "<img src=x onerror=alert(1)>",
    '<a href="javascript:alert(1)">x</a>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[data](data:text/html;base64,PHNjcmlwdD4=)",
    '<div hx-get="/api/v1/projects" hx-trigger="load">x</div>',
    '<button hx-on:click="alert(1)">x</button>',
    '<p data-hx-post="/logout">x</p>',
    "<svg onload=alert(1)></svg>",
    "<iframe src=https://evil.example></iframe>",
    "![tracker](https://evil.example/pixel.png)",
    '<style>body{background:url("https://evil.example")}</style>',
    "</textarea><script>alert(1)</script>",
    "[rel](/p/x/rate)",
]


class Tags(HTMLParser):
    """Every element and attribute of an HTML fragment, as a browser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.seen


@pytest.mark.parametrize("text", XSS)
def test_nothing_active_survives(text: str) -> None:
    for tag, attrs in elements(str(render_markdown(text))):
        assert tag in {"p", "a", "pre", "code"}, tag
        if tag == "a":
            assert set(attrs) <= {"href", "title", "target", "rel"}
            assert re.match(r"(https?:|mailto:)", attrs.get("href") or "https:")
        else:
            assert attrs == {}


def test_sanitize_strips_markup_even_without_markdown() -> None:
    html = sanitize('<a href="https://ok.example" hx-get="/x" onclick="y" style="z">ok</a>')
    assert html == (
        '<a href="https://ok.example" target="_blank" rel="noopener noreferrer nofollow ugc">ok</a>'
    )


def test_formatting_survives() -> None:
    source = "**bold** `x`\n\n```python\nprint('<b>')\n```\n\n| a |\n|---|\n| 1 |"
    html = str(render_markdown(source))
    assert "<strong>bold</strong>" in html and "<code>x</code>" in html
    assert "<pre><code>print('&lt;b&gt;')\n</code></pre>" in html
    assert "<table>" in html and "<td>1</td>" in html


def test_templates_syntax_and_unicode_are_plain_text() -> None:
    html = str(render_markdown("{{7*7}} مرحبا بالعالم 🎉"))
    assert html == "<p>{{7*7}} مرحبا بالعالم 🎉</p>\n"


def test_huge_text_renders_as_escaped_plain_text() -> None:
    html = str(render_markdown("<script>" + "x" * 300_000))
    assert html.startswith("<pre>&lt;script&gt;") and "<script" not in html
