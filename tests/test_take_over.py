"""Who keeps which tensor object at the first call (docs/design.md §3.2: identity).

A placeholder once made (looked at) always takes the real tensor over and stays the
object the built layer holds, whoever else holds it. A layer no one looked at never
made one and keeps its fresh tensors, as eager construction does. Either way the
values are eager's, bitwise.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import torch
from torch import nn

from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
X = torch.arange(6.0).reshape(2, 3)


def _eager(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 4)


def _built(layer: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer(X)
    return layer


def test_a_weakly_referenced_placeholder_is_the_built_parameter(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.Linear(4)
    ref = weakref.ref(layer.weight)
    gc.collect()
    _built(layer, 0)
    assert ref() is layer.weight
    assert_same_state(layer, _eager(0))


def test_a_placeholder_held_in_a_variable_is_the_built_parameter(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.Linear(4)
    bias = layer.bias
    _built(layer, 1)
    assert bias is layer.bias and type(bias) is nn.Parameter
    assert_same_state(layer, _eager(1))


def test_a_placeholder_an_init_call_waits_on_is_the_built_parameter() -> None:
    layer = dnn.Linear(4)
    layer.weight.data.fill_(0.5)
    _built(layer, 2)
    assert bool((layer.weight == 0.5).all())


def test_a_layer_no_one_looked_at_keeps_plain_eager_tensors(
    assert_same_state: AssertSameState,
) -> None:
    layer, eager = dnn.BatchNorm1d(), nn.BatchNorm1d(3)
    _built(layer, 3)
    eager(X)
    assert type(layer.weight) is nn.Parameter and type(layer.running_mean) is torch.Tensor
    assert_same_state(layer, eager)


def test_a_placeholder_moved_before_the_build_is_converted_as_eager_code_would(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.Linear(4).double()
    torch.manual_seed(4)
    layer(X.double())
    assert layer.weight.dtype == torch.float64
    assert_same_state(layer, _eager(4).double())
