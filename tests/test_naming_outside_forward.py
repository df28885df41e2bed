"""An error about a deferred layer raised inside a method of the model holding it
(``net.to(...)``, ``net.share_memory()``), outside any forward, names the layer's
qualified name below that model (DESIGN §3.10: every error names the layer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._naming import qualified_name


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Sequential(dnn.Conv2d(8, 3)), nn.ReLU(), dnn.Linear(4))


def test_a_model_method_names_the_layer_below_the_model() -> None:
    net = _net()
    with pytest.raises(di.NotBuiltError, match=r"Conv2d layer '0\.0', tensor 'weight'"):
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    assert di.pending(net) == ["0.0", "2"]


def test_the_model_being_called_still_names_first() -> None:
    outer = nn.Sequential(nn.Linear(2, 2))
    inner = outer[0]

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert qualified_name(inner) == "0"  # below `outer`, the model called
            return x

    outer.append(Probe())
    outer(torch.randn(1, 2))


def test_no_model_around_gives_no_name() -> None:
    layer = dnn.Linear(4)
    assert qualified_name(layer) is None
