"""MkDocs hook: the API page lists every deferred twin in ``deferinit.nn.__all__``.

``docs/api.md`` holds one line ``::: deferinit.nn.*``; at build time it becomes one
``::: deferinit.nn.NAME`` entry per layer class (alphabetical), then the tables the
twins are made from, so a twin added to ``nn.py`` appears without editing the page.
"""

from __future__ import annotations

from typing import Any

from deferinit import nn as dnn

WILDCARD = "::: deferinit.nn.*"


def twin_entries() -> str:
    """The Markdown the wildcard line stands for."""
    names = list(dnn.__all__)
    layers = sorted(n for n in names if isinstance(getattr(dnn, n), type))
    tables = [n for n in names if not isinstance(getattr(dnn, n), type)]
    text = "".join(f"::: deferinit.nn.{n}\n\n" for n in layers)
    text += "### The tables the twins are made from\n\n"
    return text + "".join(f"::: deferinit.nn.{n}\n\n" for n in tables)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != "api.md":
        return markdown
    return markdown.replace(WILDCARD + "\n", twin_entries())
