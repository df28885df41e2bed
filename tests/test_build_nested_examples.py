"""``di.build`` given a nested tensor as an example refuses it with an
``InferenceError`` that names the example and the fix, leaving the model as it was
(DESIGN §3.10: every error from deferinit's own code is a ``DeferredInitError``);
the first forward on the nested tensor builds as eager torch runs it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _jagged() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)


def test_a_nested_example_is_refused_naming_it_and_the_fix() -> None:
    net = nn.Sequential(dnn.Linear(4))
    placeholder = net[0].weight
    with pytest.raises(di.InferenceError, match=r"argument 0 is a nested tensor.*Fix:"):
        di.build(net, _jagged())
    assert di.pending(net) == ["0"] and net[0].weight is placeholder


def test_a_dense_example_of_the_same_trailing_size_builds_it() -> None:
    net = nn.Sequential(dnn.Linear(4))
    di.build(net, (2, 5, 3))
    out = net(_jagged())
    assert out.is_nested and out.size(-1) == 4


def test_the_first_forward_on_a_nested_tensor_builds_as_eager_runs() -> None:
    x = _jagged()
    torch.manual_seed(1)
    eager = nn.Linear(3, 4)
    torch.manual_seed(1)
    layer = dnn.Linear(4)
    ours, theirs = layer(x), eager(x)
    assert all(torch.equal(a, b) for a, b in zip(ours.unbind(), theirs.unbind(), strict=True))
