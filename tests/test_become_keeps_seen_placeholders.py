"""A placeholder someone looked at is the object the built layer holds, whoever
still holds it (docs/design.md §3.2, §3.10: every parameter object is kept).

A user may keep only ``id()``s, or compare objects later through a weak-free
route; the objects made when the placeholders were first looked at are the
built layer's, and their values are eager's, bitwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def test_ids_of_placeholders_looked_at_are_the_built_parameters_ids() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(3))
    ids = [id(p) for p in net.parameters()]
    net(torch.rand(2, 5))
    assert [id(p) for p in net.parameters()] == ids


def test_ids_of_buffers_looked_at_are_the_built_buffers_ids(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.BatchNorm1d()
    ids = [id(t) for t in (*layer.parameters(), *layer.buffers())]
    x = torch.arange(6.0).reshape(2, 3)
    torch.manual_seed(0)
    layer(x)
    assert [id(t) for t in (*layer.parameters(), *layer.buffers())] == ids
    eager = nn.BatchNorm1d(3)
    eager(x)
    assert type(layer.weight) is nn.Parameter and type(layer.running_mean) is torch.Tensor
    assert_same_state(layer, eager)


def test_a_layer_looked_at_builds_with_eager_values(assert_same_state: AssertSameState) -> None:
    layer = dnn.Linear(4)
    ids = [id(p) for p in layer.parameters()]
    x = torch.rand(2, 3)
    torch.manual_seed(5)
    layer(x)
    torch.manual_seed(5)
    eager = nn.Linear(3, 4)
    assert [id(p) for p in layer.parameters()] == ids
    assert_same_state(layer, eager)
