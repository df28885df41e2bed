"""``di.summary``: rows, states, ``?`` for unknown sizes, totals and renderings."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._present._summary import Row, Summary


def _mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))


def _rows(table: Summary) -> dict[str, Row]:
    return {row.name: row for row in table.rows}


def _shapes(row: Row) -> dict[str, tuple[int | None, ...] | None]:
    return {p.name: p.shape for p in row.parameters}


def _args(row: Row) -> dict[str, str]:
    return {k: repr(v) for k, v in row.arguments.items()}


class _Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.scale = nn.Parameter(torch.ones(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x) * self.scale  # (B, out_dim)
        return out


LazyBlock = di.defer(_Block, in_dim=di.dim(-1))


# -- before the build ------------------------------------------------------------------


def test_before_build_unknown_sizes_are_question_marks() -> None:
    table = di.summary(_mlp())
    rows = _rows(table)
    assert list(rows) == ["0", "1", "2"]
    assert [r.layer for r in table.rows] == ["Linear", "ReLU", "Linear"]
    assert [r.state for r in table.rows] == ["deferred", "built", "deferred"]
    assert _args(rows["0"]) == {"in_features": "?"}
    assert _args(rows["1"]) == {}
    # The known half of a shape is shown; only the inferred size is unknown.
    assert _shapes(rows["0"]) == {"weight": (256, None), "bias": (256,)}
    assert rows["0"].count is None
    assert rows["1"].count == 0
    assert all(r.output is None for r in table.rows)
    text = str(table)
    assert "in_features=?" in text
    assert "weight (256, ?), bias (256,)" in text
    assert "output" in text.splitlines()[0]  # no examples: the output column shows "?"


def test_before_build_totals_count_the_known_part_and_the_unknown_tensors() -> None:
    totals = di.summary(_mlp()).totals()
    assert totals["parameters"] == 256 + 10  # the biases
    assert totals["unknown"] == 2  # the two weights
    assert totals["bytes"] == {"float32": 266 * 4}
    text = str(di.summary(_mlp()))
    assert "Parameters: 266 + ? (266 + ? trainable); 2 of unknown size" in text
    assert "Parameter bytes: float32 1,064 + ?" in text


def test_examples_infer_every_size_and_change_nothing() -> None:
    net = _mlp()
    placeholders = [id(p) for p in net.parameters()]
    table = di.summary(net, (2, 20))
    rows = _rows(table)
    assert _args(rows["0"]) == {"in_features": "20"}
    assert _args(rows["2"]) == {"in_features": "256"}
    assert _shapes(rows["0"]) == {"weight": (256, 20), "bias": (256,)}
    assert _shapes(rows["2"]) == {"weight": (10, 256), "bias": (10,)}
    assert [r.output for r in table.rows] == [(2, 256), (2, 256), (2, 10)]
    assert [r.count for r in table.rows] == [5376, 0, 2570]
    assert [r.state for r in table.rows] == ["deferred", "built", "deferred"]
    assert table.output == (2, 10)
    assert table.totals()["parameters"] == 7946
    assert table.totals()["unknown"] == 0
    # Still unbuilt, with the same placeholder objects.
    assert di.pending(net) == ["0", "2"]
    assert [id(p) for p in net.parameters()] == placeholders


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = dnn.Linear(8)
        self.used = dnn.Linear(2)
        self.unused = dnn.Linear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.used(self.body(x))
        return out


def test_layers_the_examples_do_not_reach_stay_unknown() -> None:
    rows = _rows(di.summary(TwoHeads(), (4, 5)))
    assert list(rows) == ["body", "used", "unused"]
    assert _args(rows["used"]) == {"in_features": "8"}
    assert rows["used"].output == (4, 2)
    assert _args(rows["unused"]) == {"in_features": "?"}
    assert _shapes(rows["unused"]) == {"weight": (3, None), "bias": (3,)}
    assert rows["unused"].output is None


def test_examples_may_be_tensors_meta_tensors_and_keywords() -> None:
    for example in (torch.randn(3, 7), torch.empty(3, 7, device="meta"), torch.Size([3, 7])):
        assert _args(di.summary(dnn.Linear(4), example).rows[0]) == {"in_features": "7"}
    by_keyword = di.summary(dnn.Linear(4), input=(5, 6))
    assert by_keyword.rows[0].output == (5, 4)
    assert _shapes(by_keyword.rows[0]) == {"weight": (4, 6), "bias": (4,)}


def test_the_summarized_layer_itself_is_a_row_named_root() -> None:
    table = di.summary(dnn.Linear(4))
    assert [(r.name, r.layer) for r in table.rows] == [("", "Linear")]
    assert str(table).splitlines()[2].startswith("(root)  Linear")


def test_a_deferred_block_is_one_row_until_built_then_its_layers_show() -> None:
    net = nn.Sequential(LazyBlock(out_dim=4), dnn.Linear(2))
    before = _rows(di.summary(net))
    assert list(before) == ["0", "1"]  # a placeholder's internal slots are not rows
    assert _args(before["0"]) == {"in_dim": "?"}
    assert _shapes(before["0"]) == {"scale": (4,), "proj.weight": (4, None), "proj.bias": (4,)}

    seen = _rows(di.summary(net, (2, 3)))
    assert _shapes(seen["0"]) == {"scale": (4,), "proj.weight": (4, 3), "proj.bias": (4,)}
    assert seen["0"].count == 4 + 12 + 4

    net(torch.randn(2, 3))
    after = _rows(di.summary(net))
    assert list(after) == ["0", "0.proj", "1"]
    assert (after["0"].layer, after["0"].state) == ("_Block", "built")
    assert _args(after["0"]) == {"in_dim": "3"}
    assert _shapes(after["0"]) == {"scale": (4,)}  # each tensor in its owner's row
    assert _shapes(after["0.proj"]) == {"weight": (4, 3), "bias": (4,)}
    assert di.summary(net).totals()["parameters"] == 20 + 10


# -- after the build -------------------------------------------------------------------


def test_after_build_rows_show_the_built_layers() -> None:
    net = _mlp()
    net(torch.randn(2, 20))
    table = di.summary(net)
    rows = _rows(table)
    assert [r.state for r in table.rows] == ["built"] * 3
    assert _args(rows["0"]) == {"in_features": "20"}
    assert _shapes(rows["2"]) == {"weight": (10, 256), "bias": (10,)}
    assert table.totals() == {
        "parameters": 7946,
        "trainable": 7946,
        "unknown": 0,
        "bytes": {"float32": 7946 * 4},
        "buffer_bytes": {},
    }
    with_examples = di.summary(net, (5, 20))
    assert [r.output for r in with_examples.rows] == [(5, 256), (5, 256), (5, 10)]


def test_explicit_sizes_plain_torch_layers_and_torch_lazy_layers() -> None:
    net = nn.Sequential(dnn.Linear(8, in_features=3), nn.Linear(8, 2), nn.LazyLinear(5))
    rows = _rows(di.summary(net))
    assert (_args(rows["0"]), rows["0"].state) == ({"in_features": "3"}, "built")
    assert (_args(rows["1"]), rows["1"].state) == ({}, "built")
    assert (_shapes(rows["2"]), rows["2"].state) == (
        {"weight": None, "bias": None},
        "lazy (di.adopt)",
    )


def test_frozen_tied_and_mixed_dtype_parameters_in_the_totals() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2).half())
    net[1].weight = net[0].weight  # tied: counted once
    net[0].bias.requires_grad_(False)
    totals = di.summary(net).totals()
    assert totals["parameters"] == 16 + 4 + 4 + 8 + 2
    assert totals["trainable"] == 16 + 4 + 8 + 2
    assert totals["bytes"] == {"float32": (16 + 4 + 4) * 4, "float16": (8 + 2) * 2}


def test_buffers_are_listed_and_counted_apart() -> None:
    table = di.summary(nn.Sequential(dnn.BatchNorm1d()), (4, 6))
    row = table.rows[0]
    assert {b.name: b.shape for b in row.buffers} == {
        "running_mean": (6,),
        "running_var": (6,),
        "num_batches_tracked": (),
    }
    assert table.totals()["buffer_bytes"] == {"float32": 48, "int64": 8}
    assert "Buffer bytes: float32 48 (48 B), int64 8 (8 B)" in str(table)


def test_a_placeholder_moved_to_float64_counts_float64_bytes() -> None:
    table = di.summary(dnn.Linear(4).double(), (2, 3))
    assert table.totals()["bytes"] == {"float64": 16 * 8}


def test_tuple_outputs_show_every_shape() -> None:
    table = di.summary(nn.Sequential(dnn.LSTM(7, batch_first=True)), (2, 5, 3))
    assert table.rows[0].output == [(2, 5, 7), [(1, 2, 7), (1, 2, 7)]]
    assert "[(2, 5, 7), [(1, 2, 7), (1, 2, 7)]]" in str(table)


def test_examples_that_do_not_fit_raise_the_shape_error() -> None:
    net = _mlp()
    net(torch.randn(2, 20))
    with pytest.raises(di.ShapeMismatchError, match="in_features=20"):
        di.summary(net, (2, 30))


def test_summary_needs_a_module() -> None:
    with pytest.raises(TypeError, match="di.summary expects an nn.Module, got int"):
        di.summary(3)  # type: ignore[arg-type]


# -- meta models -----------------------------------------------------------------------


def test_a_meta_model_is_summarized_without_allocating() -> None:
    # 10**5 x 10**5 floats are 40 GB and 10**6 x 10**6 are 4 TB: touching data would fail.
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(10**5, 10**5), nn.Linear(10**5, 10**6, bias=False))
        huge = nn.Linear(10**6, 10**6)
    table = di.summary(net)
    assert [r.state for r in table.rows] == ["meta", "meta"]
    assert [r.count for r in table.rows] == [10**10 + 10**5, 10**11]
    assert table.totals()["bytes"] == {"float32": (10**10 + 10**5 + 10**11) * 4}
    assert "meta" in str(table)
    assert di.summary(huge).rows[0].count == 10**12 + 10**6
    assert all(p.device.type == "meta" for p in net.parameters())


def test_a_meta_model_with_deferred_layers_and_examples() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(10**5, 10**5), dnn.Linear(10**5))
    table = di.summary(net, (3, 10**5))
    rows = _rows(table)
    assert (rows["0"].state, rows["1"].state) == ("meta", "deferred")
    assert _shapes(rows["1"]) == {"weight": (10**5, 10**5), "bias": (10**5,)}
    assert table.output == (3, 10**5)
    assert di.pending(net) == ["1"]


def test_layers_built_on_meta_show_state_meta() -> None:
    net = di.build(_mlp(), (2, 20), device="meta")
    table = di.summary(net)
    assert [r.state for r in table.rows] == ["meta", "built", "meta"]
    assert _args(_rows(table)["0"]) == {"in_features": "20"}
    assert table.totals()["parameters"] == 7946


class _Tokens(nn.Module):
    """Token and position embeddings (positions made on the default device, as
    models do), a deferred projection, a norm and a deferred head."""

    def __init__(self, eager: Any) -> None:
        super().__init__()
        self.tok = eager(lambda: nn.Embedding(100, 16))
        self.pos = eager(lambda: nn.Embedding(32, 16))
        self.proj = dnn.Linear(32)
        self.norm = eager(lambda: nn.LayerNorm(32))
        self.head = dnn.Linear(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])  # (T,) on the default device
        x = self.tok(ids) + self.pos(positions)  # (B, T, 16)
        return self.head(self.norm(self.proj(x)))  # type: ignore[no-any-return]


def _on_meta(make: Any) -> nn.Module:
    with torch.device("meta"):
        return make()  # type: ignore[no-any-return]


@pytest.mark.parametrize("eager", [lambda make: make(), _on_meta], ids=["real", "declared-on-meta"])
@pytest.mark.parametrize("built", [True, False], ids=["built-on-meta", "unbuilt"])
def test_a_mixed_model_is_summarized_with_examples(eager: Any, built: bool) -> None:
    # Eager layers (real, or declared under torch.device("meta")) beside deferred
    # ones (unbuilt, or built on meta): every row gets its output shape.
    net = _Tokens(eager)
    ids = torch.randint(0, 100, (2, 5))
    if built:
        di.build(net, ids, device="meta")
    before = [(n, p) for n, p in net.named_parameters()]
    table = di.summary(net, ids)
    rows = _rows(table)
    assert rows["tok"].output == (2, 5, 16) and rows["pos"].output == (5, 16)
    assert rows["proj"].output == (2, 5, 32) and rows["norm"].output == (2, 5, 32)
    assert rows["head"].output == (2, 5, 8) and table.output == (2, 5, 8)
    assert _args(rows["proj"]) == {"in_features": "16"}
    assert _shapes(rows["head"]) == {"weight": (8, 32), "bias": (8,)}
    assert rows["proj"].state == ("meta" if built else "deferred")
    assert table.totals()["parameters"] == 1600 + 512 + 544 + 64 + 264
    # Nothing changed: the same parameter objects, on the same devices.
    assert [(n, p) for n, p in net.named_parameters()] == before
    assert di.pending(net) == ([] if built else ["proj", "head"])


def test_a_mixed_model_with_real_layers_built_on_meta_from_a_real_example() -> None:
    net = nn.Sequential(nn.Linear(16, 16), dnn.Linear(32), nn.LayerNorm(32), dnn.Linear(8))
    x = torch.randn(2, 16)
    di.build(net, x, device="meta")
    table = di.summary(net, x)
    assert [r.output for r in table.rows] == [(2, 16), (2, 32), (2, 32), (2, 8)]
    assert [r.state for r in table.rows] == ["built", "meta", "built", "meta"]
    assert net[1].weight.is_meta and not net[0].weight.is_meta


# -- renderings ------------------------------------------------------------------------


def test_text_is_an_aligned_table_with_totals() -> None:
    lines = str(di.summary(_mlp(), (2, 20))).splitlines()
    header, rule = lines[0], lines[1]
    assert header.split() == [
        "name",
        "layer",
        "arguments",
        "output",
        "parameters",
        "count",
        "state",
    ]
    # Every column starts where its header does.
    for line in lines[2:5]:
        assert line[header.index("layer")] != " "
        assert line[header.index("state")] != " "
        assert line[header.index("state") - 1] == " "
    assert lines[5] == rule
    assert lines[2].split()[:4] == ["0", "Linear", "in_features=20", "(2,"]
    assert lines[6:] == [
        "Parameters: 7,946 (7,946 trainable)",
        "Parameter bytes: float32 31,784 (31.0 KiB)",
        "Output: (2, 10)",
    ]
    assert repr(di.summary(_mlp())) == str(di.summary(_mlp()))


def test_print_writes_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    print(di.summary(_mlp()))
    assert "in_features=?" in capsys.readouterr().out


def test_to_dict_is_plain_json() -> None:
    data: dict[str, Any] = di.summary(_mlp(), (2, 20)).to_dict()
    assert json.loads(json.dumps(data)) == data
    first = data["rows"][0]
    assert first == {
        "name": "0",
        "layer": "Linear",
        "arguments": {"in_features": 20},
        "output_shape": [2, 256],
        "parameters": [
            {"name": "weight", "shape": [256, 20], "dtype": "float32", "numel": 5120},
            {"name": "bias", "shape": [256], "dtype": "float32", "numel": 256},
        ],
        "buffers": [],
        "count": 5376,
        "state": "deferred",
    }
    assert data["totals"]["parameters"] == 7946
    assert data["output_shape"] == [2, 10]


def test_to_dict_marks_unknowns() -> None:
    data = di.summary(_mlp()).to_dict()
    assert json.loads(json.dumps(data)) == data
    first = data["rows"][0]
    assert first["arguments"] == {"in_features": "?"}
    assert first["parameters"][0]["shape"] == [256, None]
    assert first["parameters"][0]["numel"] is None
    assert (first["count"], first["output_shape"]) == (None, None)
    assert data["totals"]["unknown"] == 2


def test_html_for_jupyter() -> None:
    page = di.summary(_mlp(), (2, 20))._repr_html_()
    assert page.startswith("<table>")
    assert "<th>arguments</th>" in page
    assert "<td>in_features=20</td>" in page
    assert "Parameters: 7,946" in page


def test_html_escapes_names() -> None:
    net = nn.ModuleDict({"a<b>": nn.Linear(2, 2)})
    page = di.summary(net)._repr_html_()
    assert "a&lt;b&gt;" in page
    assert "<b>" not in page


def test_rich_renders_the_table() -> None:
    rich_console = pytest.importorskip("rich.console")
    out = io.StringIO()
    console = rich_console.Console(file=out, width=200, color_system=None)
    console.print(di.summary(_mlp(), (2, 20)))
    text = out.getvalue()
    assert "in_features=20" in text
    assert "weight (256, 20), bias (256,)" in text
    assert "Parameters: 7,946" in text
