"""A layer built on meta whose tensors all became real before ``di.materialize``
(tied to a real tensor before the build, or loaded from a checkpoint) still
constructs again at materialize, for its draws alone: eager's construction drew
for it, so the layers after it, and the generator, end as eager's. Its real
tensors are kept, and a second ``di.materialize`` draws nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from conftest import RefusingInit
from deferinit import nn as dnn


def _same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_layer_tied_to_a_real_tensor_draws_as_eager() -> None:
    shared = nn.Parameter(torch.ones(50, 16))
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(16, 50, bias=False), nn.Linear(50, 4))
    eager[0].weight = shared
    after_eager = torch.get_rng_state()
    model = nn.Sequential(dnn.Linear(50, bias=False), dnn.Linear(4))
    model[0].weight = shared
    di.build(model, (2, 16), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    assert model[0].weight is shared
    assert torch.equal(shared, torch.ones(50, 16))  # the tie's values are kept
    _same(model, eager)
    assert torch.equal(torch.get_rng_state(), after_eager)
    before = torch.get_rng_state()
    di.materialize(model)  # nothing left to fill: no draw either
    assert torch.equal(torch.get_rng_state(), before)


def _mlp(deferred: bool) -> nn.Module:
    if deferred:
        return nn.Sequential(dnn.Linear(64), nn.ReLU(), dnn.Linear(32), nn.ReLU(), dnn.Linear(10))
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def test_partial_load_after_a_meta_build_then_materialize_equals_eager() -> None:
    torch.manual_seed(1)
    checkpoint = {k: v for k, v in _mlp(False).state_dict().items() if k.startswith("2.")}
    torch.manual_seed(0)
    eager = _mlp(False)
    eager.load_state_dict(checkpoint, strict=False)
    after_eager = torch.get_rng_state()
    model = di.build(_mlp(True), (2, 20), device="meta")
    di.load_state_dict(model, checkpoint, strict=False)
    torch.manual_seed(0)
    di.materialize(model)
    _same(model, eager)
    assert torch.equal(torch.get_rng_state(), after_eager)


def test_failed_materialize_leaves_the_real_layer_waiting_for_its_draws() -> None:
    shared = nn.Parameter(torch.ones(8, 3))
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 8, bias=False), nn.Linear(8, 4))
    eager[0].weight = shared
    model = nn.Sequential(dnn.Linear(8, bias=False), dnn.Linear(4))
    model[0].weight = shared
    di.build(model, (2, 3), device="meta")
    refusing = RefusingInit()  # the second layer's initializer raises
    di.initialize(model[1], refusing)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="init refused"):
        di.materialize(model)
    assert model[1].weight.is_meta
    refusing.stop()
    torch.manual_seed(0)
    di.materialize(model)  # the first layer draws again, as eager's did
    assert torch.equal(model.get_parameter("1.weight"), eager.get_parameter("1.weight"))


class _Recorded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.head = dnn.Linear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stem(x))
        return out


def test_a_second_materialize_of_a_recorded_model_draws_nothing() -> None:
    model = di.deferred_init(_Recorded)
    di.build(model, (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    before = torch.get_rng_state()
    di.materialize(model)
    assert torch.equal(torch.get_rng_state(), before)


class _RecordedHead(nn.Module):
    def __init__(self, eager: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.head = nn.Linear(6, 7) if eager else dnn.Linear(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stem(x))
        return out


def test_a_recorded_twin_loaded_whole_draws_once_in_its_replay() -> None:
    torch.manual_seed(9)
    head = {f"0.{k}": v for k, v in _RecordedHead(True).state_dict().items() if "head" in k}
    torch.manual_seed(0)
    eager = nn.Sequential(_RecordedHead(True), nn.Linear(7, 3))
    eager.load_state_dict(head, strict=False)
    after_eager = torch.get_rng_state()
    model = nn.Sequential(di.deferred_init(_RecordedHead), dnn.Linear(3))
    di.build(model, (2, 5), device="meta")
    di.load_state_dict(model, head, strict=False)
    torch.manual_seed(0)
    di.materialize(model)
    _same(model, eager)
    assert torch.equal(torch.get_rng_state(), after_eager)
