"""Grad modes and torch's defaults (docs/design.md §3.10): a first call under ``no_grad`` or
``inference_mode`` builds ordinary trainable parameters, and a layer is built
under the default dtype and device in effect where it was declared, as eager
construction at that line would be, with eager's values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


@pytest.fixture
def restore_defaults() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    torch.set_default_device(None)


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(MODES))
def test_first_call_under_a_no_grad_mode_builds_trainable_parameters_equal_to_eager(
    mode: str, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    net = nn.Sequential(dnn.Linear(8), dnn.BatchNorm1d(), nn.ReLU(), dnn.Linear(2))
    with MODES[mode]():
        net(x)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with MODES[mode]():
        reference(x)
    assert not any(t.is_inference() for t in [*net.parameters(), *net.buffers()])
    assert all(p.requires_grad for p in net.parameters())
    assert_same_state(net, reference)
    net(x).sum().backward()  # training works afterwards
    assert all(p.grad is not None for p in net.parameters())


def test_initializer_at_a_first_call_under_inference_mode_gives_trainable_parameters() -> None:
    layer = di.initialize(dnn.Linear(4), {"*.weight": nn.init.ones_})
    with torch.inference_mode():
        out = layer(torch.randn(2, 3))
    assert out.is_inference()  # the call itself ran in the user's mode
    assert not layer.weight.is_inference() and layer.weight.requires_grad
    assert torch.equal(layer.weight, torch.ones(4, 3))
    layer(torch.randn(2, 3)).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.usefixtures("restore_defaults")
@pytest.mark.parametrize(
    ("declared", "called"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
@pytest.mark.parametrize("how", ["first forward", "di.build", "di.load_state_dict"])
def test_layer_is_built_in_the_default_dtype_of_its_declaration(
    declared: torch.dtype, called: torch.dtype, how: str, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(2, 5, dtype=declared)
    torch.set_default_dtype(declared)
    torch.manual_seed(0)
    net = nn.Sequential(dnn.Linear(6), nn.Tanh(), dnn.LayerNorm())
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6))
    torch.set_default_dtype(called)
    torch.manual_seed(0)
    if how == "first forward":
        net(x)
    elif how == "di.build":
        di.build(net, x)
    else:
        di.load_state_dict(net, reference.state_dict())
    torch.manual_seed(0)
    assert net[0].weight.dtype == declared
    if how == "di.load_state_dict":
        assert_same_state(net, reference)
    else:
        torch.set_default_dtype(declared)
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6))
        assert_same_state(net, reference)
    assert torch.equal(net(x), reference(x))


@pytest.mark.usefixtures("restore_defaults")
def test_meta_build_then_materialize_uses_the_declared_dtype(
    assert_same_state: AssertSameState,
) -> None:
    torch.set_default_dtype(torch.float64)
    net = nn.Sequential(dnn.Linear(6), nn.Tanh(), dnn.Linear(2))
    torch.set_default_dtype(torch.float32)
    di.build(net, torch.empty(2, 5, dtype=torch.float64, device="meta"), device="meta")
    assert net[0].weight.dtype == torch.float64
    torch.manual_seed(0)
    di.materialize(net)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    assert_same_state(net, reference)


@pytest.mark.usefixtures("restore_defaults")
def test_a_default_device_set_after_the_declaration_does_not_move_the_build() -> None:
    layer = dnn.Linear(4)
    torch.set_default_device("meta")
    layer(torch.randn(2, 3, device="cpu"))
    torch.set_default_device(None)
    assert layer.weight.device.type == "cpu" and not layer.weight.is_meta


def test_layer_declared_under_a_device_context_is_built_on_that_device() -> None:
    with torch.device("meta"):
        net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    di.build(net, (2, 3))  # as eager construction inside the context would be
    assert all(p.is_meta for p in net.parameters())
    assert net[2].in_features == 4
