"""``di.materialize`` fills, or refuses by name, every plain tensor attribute left on
meta (docs/guarantees.md: a meta tensor nothing fills is a ``NotBuiltError``
naming it, never left behind): a deferinit-built layer whose parameters came from
a checkpoint is still rebuilt for its plain attributes; a module declared under
``torch.device("meta")`` without ``di.deferred_init`` holding one is refused
before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = torch.full((dim,), 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.scale
        return out


LazyScale = di.defer(Scale, dim=di.dim(-1))


def test_a_layer_loaded_on_meta_gets_its_plain_attribute_and_keeps_the_loaded_weights() -> None:
    torch.manual_seed(0)
    source = Scale(4)
    model = di.build(LazyScale(), (2, 4), device="meta")
    di.load_state_dict(model, source.state_dict())
    assert model.scale.is_meta and not model.lin.weight.is_meta
    di.materialize(model)
    assert torch.equal(model.scale, source.scale)
    assert torch.equal(model.lin.weight, source.lin.weight)
    assert torch.equal(model(torch.ones(1, 4)), source(torch.ones(1, 4)))


def test_a_meta_declared_module_with_a_plain_meta_tensor_is_refused_by_name() -> None:
    with torch.device("meta"):
        model = nn.Sequential(Scale(4))
    layer = model[0]
    assert isinstance(layer, Scale)
    weight = layer.lin.weight
    with pytest.raises(di.NotBuiltError, match=r"0\.scale \(Scale\).*di\.deferred_init"):
        di.materialize(model)
    assert layer.lin.weight is weight and weight.is_meta  # nothing allocated


def test_a_recorded_module_with_a_plain_tensor_is_replayed() -> None:
    torch.manual_seed(1)
    eager = Scale(4)
    model = di.deferred_init(Scale, 4)
    torch.manual_seed(1)
    di.materialize(model)
    assert torch.equal(model.scale, eager.scale) and torch.equal(model.lin.weight, eager.lin.weight)
