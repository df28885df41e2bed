"""A built layer whose tensors do not depend on its inferred size (no affine
weight, no running statistics: torch itself accepts any size there) still
refuses a changed inferred size with ``ShapeMismatchError`` (docs/design.md
§3.4), before torch runs (and warns); layers with weights keep the guard that
costs nothing until torch raises."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], str]] = [
    (
        "instance-norm-2d",
        lambda: dnn.InstanceNorm2d(),
        (2, 3, 8, 8),
        (2, 5, 8, 8),
        "num_features=3",
    ),
    (
        "group-norm-no-affine",
        lambda: dnn.GroupNorm(2, affine=False),
        (2, 4, 8),
        (2, 6, 8),
        "num_channels=4",
    ),
    (
        "batch-norm-no-affine-no-stats",
        lambda: dnn.BatchNorm1d(affine=False, track_running_stats=False),
        (4, 3),
        (4, 5),
        "num_features=3",
    ),
    (
        "instance-norm-1d-explicit",
        lambda: dnn.InstanceNorm1d(num_features=3),
        (2, 3, 8),
        (2, 5, 8),
        "num_features=3",
    ),
    (
        "instance-norm-rank-generic",
        lambda: dnn.InstanceNorm(),
        (2, 3, 8, 8),
        (2, 5, 8, 8),
        "num_features=3",
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("make", "first", "changed", "built"), [c[1:] for c in CASES], ids=IDS)
def test_a_changed_size_torch_does_not_enforce_raises_shape_mismatch(
    make: Callable[[], nn.Module], first: tuple[int, ...], changed: tuple[int, ...], built: str
) -> None:
    net = nn.Sequential(make())
    net(torch.rand(first))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(di.ShapeMismatchError) as caught:
            net(torch.rand(changed))
    assert not seen  # InstanceNorm's own warning does not come first
    text = str(caught.value)
    assert text.startswith(f"{type(net[0]).__name__} layer '0'"), text
    assert built in text and f"shape {changed}" in text and "Fix:" in text


@pytest.mark.parametrize(("make", "first", "changed", "built"), [c[1:] for c in CASES], ids=IDS)
def test_the_built_size_still_runs_as_eager(
    make: Callable[[], nn.Module], first: tuple[int, ...], changed: tuple[int, ...], built: str
) -> None:
    layer = make()
    x = torch.rand(first)
    layer(x)
    eager = copy.deepcopy(layer)
    eager.__dict__.pop("forward")  # the class's own forward, unguarded
    assert torch.equal(layer(x), eager(x))


def test_an_unbatched_input_of_the_built_size_is_accepted_as_eager() -> None:
    layer = dnn.InstanceNorm()  # becomes InstanceNorm2d, which takes (C, H, W) too
    layer(torch.rand(2, 3, 8, 8))
    x = torch.rand(3, 8, 8)
    assert torch.equal(layer(x), nn.InstanceNorm2d(3)(x))


def test_layers_with_weights_keep_the_guard_that_costs_nothing() -> None:
    layer = dnn.GroupNorm(2)
    layer(torch.rand(2, 4, 8))
    free = dnn.GroupNorm(2, affine=False)
    free(torch.rand(2, 4, 8))
    assert type(layer.__dict__["forward"]) is not type(free.__dict__["forward"])
    with pytest.raises(di.ShapeMismatchError, match="num_channels=4"):
        layer(torch.rand(2, 6, 8))


@pytest.mark.parametrize(
    "copy_of",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_a_copied_layer_still_checks(copy_of: Callable[[Any], Any]) -> None:
    net = nn.Sequential(dnn.InstanceNorm2d())
    x = torch.rand(2, 3, 8, 8)
    net(x)
    copied = copy_of(net)
    assert torch.equal(copied(x), net(x))
    with pytest.raises(di.ShapeMismatchError, match="num_features=3"):
        copied(torch.rand(2, 5, 8, 8))
    forward = copy_of(net[0].forward)
    with pytest.raises(di.ShapeMismatchError, match="num_features=3"):
        forward(torch.rand(2, 5, 8, 8))


# A graph break (the _LayerRef bug before this fix) made Dynamo warn about a
# non-leaf .grad while resuming, as tests/test_compile_export.py notes.
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compile_of_a_checked_layer_gives_eagers_outputs(fullgraph: bool) -> None:
    net = nn.Sequential(dnn.Linear(4), dnn.InstanceNorm1d(), nn.ReLU())
    x = torch.rand(2, 4, 6)
    net(x)
    compiled: Any = torch.compile(net, backend="eager", fullgraph=fullgraph)
    assert torch.equal(compiled(x), net(x))
    changed = torch.rand(2, 3, 6)  # InstanceNorm1d built for num_features=4
    with pytest.raises(di.ShapeMismatchError, match="num_features=4"):
        net(changed)
    with pytest.raises(di.ShapeMismatchError, match="num_features=4"):
        compiled(changed)
