"""A layer deferinit built on meta may hold plain tensor attributes (neither
parameters nor buffers) that its constructor made: ``di.materialize`` fills them
with the values eager construction gives, under their own objects, or refuses
those whose values nothing knows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class Scale(nn.Module):
    """Plain tensor attributes beside a submodule's parameters: a constant, a
    random draw (after the Linear's), an integer one, one in a list, one on a
    plain submodule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.scale = torch.full((dim,), 0.5)
        self.noise = torch.randn(dim)
        self.steps = torch.arange(dim)
        self.table = [torch.ones(dim) * 2]
        self.inner: Any = nn.Module()
        self.inner.shift = torch.rand(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.scale + self.noise + self.steps
        shifted: torch.Tensor = out * self.table[0] + self.inner.shift
        return shifted


LazyScale = di.defer(Scale, dim=di.dim(-1))

_ATTRIBUTES = ("scale", "noise", "steps", "inner.shift")


def _attribute(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    value: torch.Tensor = getattr(module.get_submodule(owner), leaf)
    return value


def _on_meta(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return di.build(LazyScale(), (2, 4), device="meta")


def test_plain_tensor_attributes_are_eagers_values_under_their_own_objects() -> None:
    model = _on_meta()
    objects = {name: _attribute(model, name) for name in _ATTRIBUTES}
    listed = model.table[0]
    torch.manual_seed(7)
    di.materialize(model)
    after = torch.rand(3)
    torch.manual_seed(7)
    eager = Scale(4)
    assert torch.equal(torch.rand(3), after)  # the draws were eager's, in order
    for name in _ATTRIBUTES:
        got = _attribute(model, name)
        assert got is objects[name]
        assert got.device.type == "cpu"
        assert got.dtype == _attribute(eager, name).dtype
        assert torch.equal(got, _attribute(eager, name)), name
    assert model.table[0] is listed and torch.equal(listed, eager.table[0])
    for name, tensor in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.randn(2, 4)
    assert torch.equal(model(x), eager(x))


def test_a_real_build_and_a_build_on_meta_then_materialize_agree() -> None:
    torch.manual_seed(1)
    real = di.build(LazyScale(), (2, 4))
    model = _on_meta(1)
    torch.manual_seed(1)
    di.materialize(model)
    for name in _ATTRIBUTES:
        assert torch.equal(_attribute(model, name), _attribute(real, name)), name


def test_dtype_converts_parameters_and_leaves_plain_attributes_as_module_to_does() -> None:
    model = _on_meta()
    torch.manual_seed(7)
    di.materialize(model, dtype=torch.float64, device="cpu")
    torch.manual_seed(7)
    eager = Scale(4).to(torch.float64)
    assert model.lin.weight.dtype == torch.float64
    for name in _ATTRIBUTES:
        got, want = _attribute(model, name), _attribute(eager, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert model.steps.dtype == torch.int64


def test_seed_fills_plain_attributes_the_same_way_every_time() -> None:
    first = _on_meta()
    second = _on_meta(5)
    torch.manual_seed(11)
    di.materialize(first, seed=3)
    di.materialize(second, seed=3)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), after)  # seed= leaves the global generator alone
    for name in _ATTRIBUTES:
        got = _attribute(first, name)
        assert got.device.type == "cpu"
        assert torch.equal(got, _attribute(second, name)), name
    assert torch.equal(first.scale, torch.full((4,), 0.5))
    assert torch.equal(first.steps, torch.arange(4))
    first(torch.randn(2, 4))


def test_seed_gives_the_parameters_the_values_they_have_without_plain_attributes() -> None:
    class Plain(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(x)
            return out

    model = _on_meta()
    plain: Any = di.build(di.defer(Plain, dim=di.dim(-1))(), (2, 4), device="meta")
    di.materialize(model, seed=3)
    di.materialize(plain, seed=3)
    assert torch.equal(model.lin.weight, plain.lin.weight)
    assert torch.equal(model.lin.bias, plain.lin.bias)


def test_a_plain_meta_attribute_set_after_the_build_is_refused_by_name() -> None:
    model = _on_meta()
    model.inner.extra = torch.empty(3, device="meta")
    weight = model.lin.weight
    with pytest.raises(di.NotBuiltError, match=r"'inner\.extra'.*constructor does not make"):
        di.materialize(model)
    assert weight.device.type == "meta" and model.scale.device.type == "meta"
    del model.inner.extra
    di.materialize(model)
    assert model.scale.device.type == "cpu"


def test_a_plain_meta_attribute_replaced_with_another_shape_is_refused() -> None:
    model = _on_meta()
    model.scale = torch.empty(5, device="meta")
    with pytest.raises(di.NotBuiltError, match=r"'scale'"):
        di.materialize(model)
    assert model.scale.device.type == "meta"


def test_a_later_failure_puts_plain_attributes_back_on_meta() -> None:
    model: Any = nn.Sequential(LazyScale(), dnn.Linear(3))
    di.build(model, (2, 4), device="meta")
    scale = model[0].scale

    def fail(module: nn.Module) -> None:
        raise RuntimeError("initializer failed")

    di.initialize(model[1], fail)
    with pytest.raises(RuntimeError, match="initializer failed"):
        di.materialize(model)
    assert model[0].scale is scale and scale.device.type == "meta"
    assert model[0].lin.weight.device.type == "meta"


def test_a_sharded_layer_gets_its_plain_attributes_whole() -> None:
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 - DTensor stack on demand

    results: dict[int | None, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        for seed in (None, 3):
            model: Any = nn.Sequential(LazyScale())
            di.build(model, (2, 4), device="meta")
            fully_shard(model[0])
            torch.manual_seed(7)
            di.materialize(model, seed=seed)
            after = torch.rand(3)
            local = model[0].lin.weight.to_local()
            results[seed] = (model[0], local, after)
    finally:
        dist.destroy_process_group()
    sharded, local, after = results[None]
    torch.manual_seed(7)
    eager = Scale(4)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(local, eager.lin.weight[:2])
    for name in _ATTRIBUTES:
        assert torch.equal(_attribute(sharded, name), _attribute(eager, name)), name
    seeded: Any = di.build(nn.Sequential(LazyScale()), (2, 4), device="meta")
    di.materialize(seeded, seed=3)  # the same qualified names: the same values
    seeded = seeded[0]
    sharded, local, _ = results[3]
    assert torch.equal(local, seeded.lin.weight[:2])
    for name in _ATTRIBUTES:
        assert torch.equal(_attribute(sharded, name), _attribute(seeded, name)), name
