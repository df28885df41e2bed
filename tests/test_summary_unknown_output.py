"""The summary's output-shape column is always there: ``?`` where no example gave
the shape (no examples at all, or a layer the examples did not reach), in the text,
the HTML and ``rich`` alike; ``to_dict`` marks the same rows' ``output_shape`` as
``None``, the JSON marker of an unknown shape (a tensor's ``shape`` too)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from test_summary import TwoHeads

HEADER = ["name", "layer", "arguments", "output", "parameters", "count", "state"]


def _mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))


def _column(text: str, header: str) -> list[str]:
    """The cells of one column of the plain table (every cell here has no spaces)."""
    lines = text.splitlines()
    start = lines[0].index(header)
    rows = lines[2 : lines.index(lines[1], 2)]
    return [line[start:].split()[0] if len(line) > start else "" for line in rows]


def test_without_examples_the_output_column_shows_question_marks() -> None:
    text = str(di.summary(_mlp()))
    assert text.splitlines()[0].split() == HEADER
    assert _column(text, "output") == ["?", "?", "?"]
    assert _column(text, "state") == ["deferred", "built", "deferred"]


def test_a_layer_the_examples_do_not_reach_shows_a_question_mark() -> None:
    text = str(di.summary(TwoHeads(), (4, 5)))
    assert _column(text, "name") == ["body", "used", "unused"]
    assert _column(text, "output") == ["(4,", "(4,", "?"]


def test_html_has_the_column_with_question_marks() -> None:
    page = di.summary(_mlp())._repr_html_()
    assert "<th>output</th>" in page
    body = page.split("<tbody>")[1]
    rows = body.split("</tr>")[:3]
    assert all("<td>?</td>" in row for row in rows)


def test_rich_has_the_column() -> None:
    console = pytest.importorskip("rich.console").Console(width=200, record=True)
    console.print(di.summary(_mlp()))
    assert "output" in console.export_text().splitlines()[1]


def test_to_dict_marks_the_same_rows_unknown() -> None:
    data = di.summary(_mlp()).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert [row["output_shape"] for row in data["rows"]] == [None, None, None]
    assert data["output_shape"] is None
    reached = di.summary(TwoHeads(), (4, 5)).to_dict()
    assert [row["output_shape"] for row in reached["rows"]] == [[4, 8], [4, 2], None]


def test_a_layer_whose_output_is_none_is_not_unknown() -> None:
    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    table = di.summary(nn.Sequential(dnn.Linear(3), Nothing()), (2, 4))
    assert _column(str(table), "output") == ["(2,", "None"]
    assert [row["output_shape"] for row in table.to_dict()["rows"]] == [[2, 3], "None"]
