"""Markdown to safe HTML for untrusted text (prompts, model responses, guidelines).

Two independent layers, so a bug in one is not enough to get markup through:

1. markdown-it with raw HTML disabled: any `<tag>` in the source is escaped to text, and images
   are off (an image would make the browser fetch a URL chosen by the model).
2. nh3 (the Rust `ammonia` sanitizer) with a strict allowlist of tags and attributes. Only `href`
   and `title` survive, on links only, with http/https/mailto schemes; every other attribute,
   including anything htmx reads (`hx-*`, `data-hx-*`) or any `on*` handler, is dropped.

The templates add `hx-disable` on the containers as a third, independent guard.
"""

from __future__ import annotations

from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

ALLOWED_TAGS = frozenset(
    {
        "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6",
        "strong", "em", "del", "s", "code", "pre", "blockquote",
        "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
    }
)  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = frozenset({"http", "https", "mailto"})
# Longest text we render as markdown; beyond that it is shown as plain text so a huge response
# cannot make rendering slow. Uploads allow 200,000 characters per text.
MAX_MARKDOWN_CHARS = 250_000


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])
    md.disable(["image"])
    return md


@lru_cache(maxsize=1)
def _cleaner() -> nh3.Cleaner:
    return nh3.Cleaner(
        tags=set(ALLOWED_TAGS),
        clean_content_tags={"script", "style"},
        attributes={tag: set(attrs) for tag, attrs in ALLOWED_ATTRIBUTES.items()},
        url_schemes=set(URL_SCHEMES),
        # Relative links would point into Verdict itself (a GET on a page can lease work).
        url_relative="deny",
        # Links open in a new tab so following one never loses the rater's work in progress.
        link_rel="noopener noreferrer nofollow ugc",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )


def sanitize(html: str) -> str:
    """Keep only the allowlisted tags and attributes of an HTML fragment."""
    return _cleaner().clean(html)


def render_markdown(text: str) -> Markup:
    """Untrusted markdown as HTML that is safe to put in a page unescaped."""
    if len(text) > MAX_MARKDOWN_CHARS:
        return Markup("<pre>") + Markup.escape(text) + Markup("</pre>")
    return Markup(sanitize(_markdown().render(text)))
