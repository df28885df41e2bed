"""Make the tutorial notebooks from the tutorial pages, so that they cannot drift.

    python tools/make_notebook.py            # writes docs/tutorial.ipynb, docs/tutorial.zh.ipynb
    python tools/make_notebook.py --check    # exit 1 if a notebook is not what it would write

Each page becomes one notebook: the prose between code blocks a Markdown cell, each
```` ```python ```` block a code cell (unexecuted: CI executes it, tests/test_notebook.py).
Expected-output blocks (```` ```text ```` after ``<!-- output -->``) are left out: the
notebook shows the real output. A block's markers become cell tags:
``<!-- raises: Error -->`` the ``raises-exception`` tag that Jupyter and nbclient know,
``<!-- pending: reason -->`` and ``<!-- skip: reason -->`` the ``skip-execution`` tag
(with the reason in the cell's ``deferinit`` metadata).

The Markdown reading (``read_blocks``) is shared with tests/test_docs.py, which runs
every code block of the docs and README with the same markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = {
    ROOT / "docs" / "tutorial.md": ROOT / "docs" / "tutorial.ipynb",
    ROOT / "docs" / "tutorial.zh.md": ROOT / "docs" / "tutorial.zh.ipynb",
}

MARKER = re.compile(r"^<!--\s*(pending|raises|skip|output|torchrun)\s*(?::\s*(.*?))?\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)\s*$")
#: Markers that say "do not run this block", and why.
NOT_RUN = ("pending", "skip")


@dataclass(frozen=True)
class Marker:
    """An HTML comment right above a code block: ``<!-- kind: value -->``.

    - ``pending: what`` — uses an API that does not work yet; not run (a visible skip).
    - ``skip: why`` — cannot run in the test suite (say why); not run (a visible skip).
    - ``raises: ErrorName`` — the block's last statement raises this error.
    - ``output`` — above a ```` ```text ```` block: what the code block before prints.
    - ``torchrun`` — the block runs as one process of ``torchrun`` would (rank 0 of 1).
    """

    kind: str
    value: str


@dataclass(frozen=True)
class Block:
    """A piece of a Markdown page: prose, or a fenced block with its language."""

    line: int  # 1-based line of the opening fence (of the first prose line)
    language: str | None  # None for prose
    text: str
    markers: tuple[Marker, ...] = ()

    def marker(self, kind: str) -> Marker | None:
        return next((m for m in self.markers if m.kind == kind), None)

    @property
    def is_python(self) -> bool:
        return self.language == "python"

    @property
    def is_output(self) -> bool:
        return self.marker("output") is not None

    @property
    def not_run(self) -> Marker | None:
        """The marker that keeps this block from running, if any."""
        return next((m for m in self.markers if m.kind in NOT_RUN), None)


def read_blocks(text: str) -> list[Block]:
    """Split a Markdown page into prose and fenced blocks, markers attached.

    >>> page = "Intro.\\n\\n<!-- raises: ValueError -->\\n```python\\nint('x')\\n```\\n"
    >>> [(b.language, b.text.strip(), [m.kind for m in b.markers]) for b in read_blocks(page)]
    [(None, 'Intro.', []), ('python', "int('x')", ['raises'])]
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    prose: list[str] = []
    prose_start = 1
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            if not prose:
                prose_start = index + 1
            prose.append(lines[index])
            index += 1
            continue
        markers = _take_markers(prose)
        if "".join(prose).strip():
            blocks.append(Block(prose_start, None, "\n".join(prose).strip("\n") + "\n"))
        prose = []
        end = index + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"line {index + 1}: a code block is never closed")
        body = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(index + 1, fence.group(1) or "", body, tuple(markers)))
        index = end + 1
    if "".join(prose).strip():
        blocks.append(Block(prose_start, None, "\n".join(prose).strip("\n") + "\n"))
    return blocks


def _take_markers(prose: list[str]) -> list[Marker]:
    """Remove the marker comments at the end of ``prose`` (blank lines between allowed)."""
    markers: list[Marker] = []
    while prose and (not prose[-1].strip() or MARKER.match(prose[-1].strip())):
        found = MARKER.match(prose.pop().strip())
        if found:
            markers.insert(0, Marker(found.group(1), found.group(2) or ""))
    return markers


def notebook(text: str) -> dict[str, object]:
    """The notebook (nbformat 4.5, unexecuted) for one tutorial page."""
    cells: list[dict[str, object]] = []
    for block in read_blocks(text):
        if block.language is None:
            cells.append(_cell("markdown", block.text))
        elif block.is_python:
            cells.append(_cell("code", block.text, block.markers))
        elif not block.is_output:
            cells.append(_cell("markdown", f"```{block.language}\n{block.text}```\n"))
    for number, cell in enumerate(cells):
        cell["id"] = f"cell-{number:03d}"  # stable ids: the notebook is a pure function of the page
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _cell(kind: str, text: str, markers: Sequence[Marker] = ()) -> dict[str, object]:
    source = text.strip("\n").splitlines(keepends=True)
    metadata: dict[str, object] = {}
    tags = []
    if any(m.kind == "raises" for m in markers):
        tags.append("raises-exception")
    reasons = {m.kind: m.value for m in markers if m.kind in NOT_RUN}
    if reasons:
        tags.append("skip-execution")
        metadata["deferinit"] = reasons
    if tags:
        metadata["tags"] = tags
    cell: dict[str, object] = {"cell_type": kind, "metadata": metadata, "source": source}
    if kind == "code":
        cell |= {"execution_count": None, "outputs": []}
    return cell


def render(text: str) -> str:
    """The notebook file's exact text for a page (what ``--check`` compares)."""
    return json.dumps(notebook(text), indent=1, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for page, target in PAGES.items():
        wanted = render(page.read_text(encoding="utf-8"))
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == wanted:
            continue
        if args.check:
            stale.append(target.relative_to(ROOT))
        else:
            target.write_text(wanted, encoding="utf-8")
            print(f"wrote {target.relative_to(ROOT)}")
    for path in stale:
        print(f"{path} is out of date: run python tools/make_notebook.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
