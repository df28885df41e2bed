"""A deferinit twin declared inside a ``di.defer`` block, built on meta, then
materialized: the block's rebuild builds the twin with the sizes the model's own
twin was built with, in eager's order (DESIGN §3.3, §3.10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._errors import NotBuiltError


class Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, twin: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(in_dim, out_dim)
        self.b = dnn.Linear(out_dim) if twin else nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


class WithTail(nn.Module):
    """An eager layer after the twin: di.build constructs the twin after the
    block's __init__ (its sizes are known only then), and so must materialize."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(in_dim, 4)
        self.b = dnn.Linear(4)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c(self.b(self.a(x)))
        return out


class Outer(nn.Module):
    def __init__(self, in_dim: int, twin: bool = True) -> None:
        super().__init__()
        self.first = nn.Linear(in_dim, 6)
        inner = di.defer(Block, in_dim=di.dim(-1)) if twin else Block
        self.block = inner(out_dim=4) if twin else inner(6, 4, twin=False)  # type: ignore[call-arg]
        self.last = dnn.Linear(2) if twin else nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.last(self.block(self.first(x)))
        return out


def _eager_block() -> nn.Module:
    torch.manual_seed(0)
    return Block(5, 4, twin=False)


def _eager_outer() -> nn.Module:
    torch.manual_seed(0)
    return Outer(5, twin=False)


def _assert_equal(net: nn.Module, eager: nn.Module) -> None:
    got, want = net.state_dict(), eager.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def test_meta_build_then_materialize_equals_eager() -> None:
    net = di.defer(Block, in_dim=di.dim(-1))(out_dim=4)
    di.build(net, (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(net)
    _assert_equal(net, _eager_block())
    assert net(torch.rand(2, 5)).shape == (2, 4)


def test_real_build_equals_eager() -> None:
    net = di.defer(Block, in_dim=di.dim(-1))(out_dim=4)
    torch.manual_seed(0)
    di.build(net, (2, 5))
    _assert_equal(net, _eager_block())


def test_twin_two_levels_deep_equals_eager() -> None:
    net = di.defer(Outer, in_dim=di.dim(-1))()
    di.build(net, (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(net)
    _assert_equal(net, _eager_outer())
    assert net(torch.rand(2, 5)).shape == (2, 2)


def test_two_levels_real_build_equals_eager() -> None:
    net = di.defer(Outer, in_dim=di.dim(-1))()
    torch.manual_seed(0)
    di.build(net, (2, 5))
    _assert_equal(net, _eager_outer())


def test_seeded_materialize_gives_sizes_and_deterministic_values() -> None:
    nets = []
    for _ in range(2):
        net = di.defer(Outer, in_dim=di.dim(-1))()
        di.build(net, (2, 5), device="meta")
        di.materialize(net, seed=3)
        nets.append(net)
    eager = _eager_outer()
    for name, value in nets[0].state_dict().items():
        assert value.shape == eager.state_dict()[name].shape, name
        assert torch.equal(value, nets[1].state_dict()[name]), name
    assert nets[0](torch.rand(2, 5)).shape == (2, 2)


def test_meta_build_then_materialize_equals_real_build() -> None:
    real = di.defer(WithTail, in_dim=di.dim(-1))()
    torch.manual_seed(0)
    di.build(real, (2, 5))
    net = di.defer(WithTail, in_dim=di.dim(-1))()
    di.build(net, (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(net)
    _assert_equal(net, real)


class Queued(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(in_dim, 4)
        self.b = dnn.Linear(4)
        self.b.weight.data.normal_(0, 0.01)  # queued on b's placeholder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


@pytest.mark.parametrize("device", [None, "meta"])
def test_init_queued_on_the_twin_inside_runs(device: str | None) -> None:
    net = di.defer(Queued, in_dim=di.dim(-1))()
    torch.manual_seed(0)
    di.build(net, (2, 5), device=device)
    torch.manual_seed(0)
    di.materialize(net)
    assert net.b.weight.abs().max() < 0.1  # the queued normal_(0, 0.01) ran
    torch.manual_seed(0)
    eager = nn.Linear(5, 4), nn.Linear(4, 4)
    nn.init.normal_(eager[1].weight, 0, 0.01)
    if device is None:  # built for real under seed 0: eager's order of draws
        assert torch.equal(net.a.weight, eager[0].weight)
        assert torch.equal(net.b.weight, eager[1].weight)


def test_model_without_the_inner_twin_is_refused_unchanged() -> None:
    net = di.defer(Block, in_dim=di.dim(-1))(out_dim=4)
    di.build(net, (2, 5), device="meta")
    net.b = nn.Identity()  # the layer the block declares is gone
    with pytest.raises(NotBuiltError, match=r"declares the twin 'b' .*Identity not built"):
        di.materialize(net)
    assert net.a.weight.is_meta


class InSequential(nn.Module):
    def __init__(self, in_dim: int, twin: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(in_dim, 4)
        first = dnn.Linear(3) if twin else nn.Linear(4, 3)
        second = dnn.Linear(2) if twin else nn.Linear(3, 2)
        self.seq = nn.Sequential(first, nn.ReLU(), second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.seq(self.a(x))
        return out


def test_twins_in_a_plain_container_inside_the_block_equal_eager() -> None:
    net = di.defer(InSequential, in_dim=di.dim(-1))()
    di.build(net, (2, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(net)
    torch.manual_seed(0)
    _assert_equal(net, InSequential(5, twin=False))
