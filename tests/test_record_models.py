"""Whole models, recorded and replayed, bitwise equal to eager construction."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deferinit._record import deferred_init
from test_record_support import (
    MidSize,
    SmallResNet,
    ValuesFromValues,
    differing,
    materialize_recorded,
    recorded_and_eager,
)


def test_resnet_with_torchvision_init_loop_is_bitwise_eager() -> None:
    eager, model = recorded_and_eager(SmallResNet)
    assert differing(eager, model) == []
    # the zero-init of each residual block's last BN survived
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in model.layers)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(eager.eval()(x), model.eval()(x))


def test_values_computed_from_values_are_bitwise_eager() -> None:
    eager, model = recorded_and_eager(ValuesFromValues)
    assert differing(eager, model) == []
    assert model.head.weight is model.embed.weight
    assert "rope" not in model.state_dict()
    assert torch.equal(model.table, eager.table) and not model.table.is_meta
    assert all(torch.equal(a, b) for a, b in zip(model.extras, eager.extras, strict=True))
    assert torch.equal(model.lookup["bias"], eager.lookup["bias"])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(eager(ids), model(ids))


def test_an_optimizer_made_before_materialize_trains_every_parameter() -> None:
    model: Any = deferred_init(ValuesFromValues)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    materialize_recorded(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
    optimizer.step()
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p)] == []


def test_mid_size_model_is_bitwise_eager() -> None:
    eager, model = recorded_and_eager(lambda: MidSize(vocab=1000, dim=64, layers=2))
    assert differing(eager, model) == []


def test_deep_copied_layers_record_without_fake_tensor_warnings() -> None:
    # nn.Transformer deep-copies its layers; Tensor.__deepcopy__ asks a fake tensor for
    # its data pointer (a deprecation warning, an error under -W error).
    def transformer() -> nn.Module:
        return nn.Transformer(16, 2, 1, 1, 32, batch_first=True)

    eager, model = recorded_and_eager(transformer)
    assert differing(eager, model) == []
