"""The tutorial notebooks: made from the tutorial pages (tools/make_notebook.py), so they
cannot drift, and executed here with nbclient on an ipykernel, as a reader runs them.

Cells tagged ``skip-execution`` (a ``pending`` or ``skip`` marker in the page; the page's
own test reports them) are left out of the run; cells tagged ``raises-exception`` must
raise. ``di.summary`` shows as an HTML table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent


def _load_tool() -> ModuleType:
    path = ROOT / "tools" / "make_notebook.py"
    spec = importlib.util.spec_from_file_location("deferinit_make_notebook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


make_notebook = _load_tool()
NOTEBOOKS = sorted(make_notebook.PAGES.items())


def _ids(item: tuple[Path, Path]) -> str:
    return item[1].name


@pytest.mark.parametrize("pair", NOTEBOOKS, ids=_ids)
def test_notebook_is_made_from_its_page(pair: tuple[Path, Path]) -> None:
    page, notebook = pair
    assert notebook.is_file(), f"{notebook.name} is missing: run python tools/make_notebook.py"
    wanted = make_notebook.render(page.read_text(encoding="utf-8"))
    assert notebook.read_text(encoding="utf-8") == wanted, (
        f"{notebook.name} is out of date with {page.name}: run python tools/make_notebook.py"
    )
    nbformat.validate(nbformat.reads(wanted, as_version=4))


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("pair", NOTEBOOKS, ids=_ids)
def test_notebook_runs_and_shows_the_summary_as_an_html_table(pair: tuple[Path, Path]) -> None:
    page, path = pair
    notebook = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    notebook.cells = [c for c in notebook.cells if "skip-execution" not in _tags(c)]
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()

    code = [c for c in notebook.cells if c.cell_type == "code"]
    for cell in code:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if "raises-exception" in _tags(cell):
            assert errors, f"this cell should raise, and did not:\n{cell.source}"
        else:
            assert not errors, f"{cell.source}\n{errors}"
    summaries = [c for c in code if c.source.strip().splitlines()[-1].startswith("di.summary(")]
    assert summaries, f"{page.name} shows no di.summary as a cell's value"
    for cell in summaries:
        html = [o.data["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]
        assert html and "<table>" in html[0] and "<th>parameters</th>" in html[0], cell.source
