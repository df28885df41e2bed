"""``di.initialize`` on layers already built is all or nothing (docs/design.md
§3.10): an initializer that fails (or is interrupted, Ctrl-C included) on one
layer leaves every layer's values, parameter objects, "initialized" marks and
registrations as they were before the call."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class BoomError(Exception):
    pass


def _failing_on(last: nn.Module, error: BaseException) -> Callable[[nn.Module], None]:
    """Zeroes each Linear's weight and freezes its bias, then fails on ``last``."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            module.bias.requires_grad_(False)
            if module is last:
                raise error

    return init


@pytest.mark.parametrize("error", [BoomError("boom"), KeyboardInterrupt()])
def test_a_failing_initializer_on_eager_layers_leaves_every_value(error: BaseException) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    expected = di.DeferredInitError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected) as caught:
        di.initialize(net, _failing_on(net[1], error))
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert [torch.equal(a, b) for a, b in zip(before, params, strict=True)] == [True] * 4
    assert all(p.requires_grad for p in params)
    if isinstance(error, Exception):
        assert not isinstance(caught.value, di.InferenceError)
        assert caught.value.__cause__ is error
        assert "'1'" in str(caught.value) and "BoomError: boom" in str(caught.value)
    else:
        assert caught.value is error
    # Nothing was marked initialized: a working initializer now runs on both layers.
    di.initialize(net, {"*.weight": nn.init.ones_})
    assert all(torch.equal(layer.get_parameter("weight"), torch.ones(3, 3)) for layer in net)


def test_force_reinit_of_a_built_model_that_fails_leaves_every_value() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    net(torch.randn(2, 3))
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(di.DeferredInitError, match=r"'2'") as caught:
        di.initialize(net, _failing_on(net[2], BoomError("boom")), force_reinit=True)
    assert not isinstance(caught.value, di.InferenceError)
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert [torch.equal(a, b) for a, b in zip(before, params, strict=True)] == [True] * 4
    assert all(p.requires_grad for p in params)


def test_a_failing_mapping_initializer_leaves_every_value() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    before = [p.detach().clone() for p in net.parameters()]

    def second_bias(t: torch.Tensor) -> None:
        raise BoomError("no")

    with pytest.raises(di.DeferredInitError):
        di.initialize(net, {"*.weight": nn.init.zeros_, "1.bias": second_bias})
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_a_failed_initialize_keeps_the_earlier_registration_on_deferred_layers() -> None:
    net = nn.Sequential(nn.Linear(3, 4), dnn.Linear(2))
    di.initialize(net, {"*.weight": nn.init.ones_})  # runs on net[0] now; waits on net[1]

    def fails(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            raise BoomError("no")

    with pytest.raises(di.DeferredInitError):
        di.initialize(net, fails, force_reinit=True)
    assert torch.equal(net[0].get_parameter("weight"), torch.ones(4, 3))
    net(torch.randn(2, 3))
    # The earlier registration still holds:
    assert torch.equal(net[1].get_parameter("weight"), torch.ones(2, 4))


def test_an_initializer_that_replaces_a_parameter_is_undone_too() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]

    def init(module: nn.Module) -> None:
        if module is net[0]:
            module.weight = nn.Parameter(torch.zeros(3, 3))
            module.bias.data = torch.zeros(5)
        if module is net[1]:
            raise BoomError("no")

    with pytest.raises(di.DeferredInitError):
        di.initialize(net, init)
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
