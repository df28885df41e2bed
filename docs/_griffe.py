"""Griffe extension for the API page: docstrings written for ``help()`` and doctest,
shown as Markdown.

The package's docstrings follow torch's and the standard library's habits: examples as
bare ``>>>`` sessions (run by ``pytest --doctest-modules``) and Sphinx roles such as
``:func:`deferinit.materialize```. Markdown would render a session as nested block
quotes and a role as literal text, so before the docstring is parsed, each session
becomes a ``pycon`` code block and each role plain code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")
PROMPT = re.compile(r"^(\s*)>>> ")


def markdown_docstring(text: str) -> str:
    """The docstring with doctest sessions fenced and Sphinx roles as code.

    >>> markdown_docstring("See :func:`f`.\\n\\n>>> f()\\n1").splitlines()
    ['See `f`.', '', '```pycon', '>>> f()', '1', '```']
    """
    lines = ROLE.sub(r"`\1`", text).splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        prompt = PROMPT.match(lines[index])
        if prompt is None:
            out.append(lines[index])
            index += 1
            continue
        indent = prompt.group(1)
        out.append(f"{indent}```pycon")
        while index < len(lines) and lines[index].strip():  # a session ends at a blank line
            out.append(lines[index])
            index += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestsAsCode(griffe.Extension):
    """Rewrites every docstring the API page loads (see :func:`markdown_docstring`)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
