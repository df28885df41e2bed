"""Hooks a layer registers in its own ``__init__`` run as eager torch runs them:
on the call that builds the layer too, whether or not the user
registered hooks on the placeholder, and again after ``di.reset`` and a rebuild.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di


class Counted(nn.Module):
    """A layer whose own ``__init__`` registers a forward hook and a pre-hook."""

    def __init__(self, in_features: int, out_features: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.calls: list[str] = []
        self.register_forward_pre_hook(self._before)
        self.register_forward_hook(self._after)

    def _before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
        self.calls.append("pre")
        return (args[0] * 2,)  # the forward must see this

    def _after(
        self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor:
        self.calls.append("post")
        return output + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("forward")
        out: torch.Tensor = self.linear(x)
        return out


DeferredCounted = di.defer(Counted, in_features=di.dim(-1))


class Logged(nn.Module):
    """Own hooks that only log, into a list outside the layer (which a rebuild
    replaces)."""

    def __init__(self, in_features: int, log: list[str]) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 3)
        self.register_forward_pre_hook(lambda m, a: log.append("pre"))
        self.register_forward_hook(lambda m, a, o: log.append("post"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


DeferredLogged = di.defer(Logged, in_features=di.dim(-1))
ONE_CALL = ["pre", "forward", "post"]


def _eager_output(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    out: torch.Tensor = Counted(x.shape[-1])(x)
    return out


@pytest.mark.parametrize("user_hooks", [False, True], ids=["alone", "with_user_hooks"])
def test_own_hooks_run_once_on_the_building_call_and_on_each_later_call(user_hooks: bool) -> None:
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    layer = DeferredCounted()
    seen: list[str] = []
    if user_hooks:
        layer.register_forward_pre_hook(lambda m, a: seen.append("user pre"))
        layer.register_forward_hook(lambda m, a, o: seen.append("user post"))
    out = layer(x)
    assert layer.calls == ONE_CALL
    assert torch.equal(out, _eager_output(x))
    layer(x)
    assert layer.calls == ONE_CALL * 2
    if user_hooks:
        assert seen == ["user pre", "user post"] * 2


@pytest.mark.parametrize("user_hooks", [False, True], ids=["alone", "with_user_hooks"])
def test_own_hooks_run_once_per_call_after_reset_and_rebuild(user_hooks: bool) -> None:
    x = torch.randn(2, 4)
    layer = DeferredCounted()
    if user_hooks:
        layer.register_forward_hook(lambda m, a, o: None)
    layer(x)
    di.reset(layer)
    layer(torch.randn(2, 6))
    assert layer.calls == ONE_CALL  # a fresh layer: its own list, its own hooks
    layer(torch.randn(2, 6))
    assert layer.calls == ONE_CALL * 2


def test_own_hooks_run_once_when_nested_in_a_sequential() -> None:
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    model = nn.Sequential(DeferredCounted(), nn.ReLU())
    out = model(x)
    assert model[0].calls == ONE_CALL
    torch.manual_seed(0)
    assert torch.equal(out, nn.Sequential(Counted(4), nn.ReLU())(x))


def test_own_hooks_run_as_often_as_a_user_hook_under_di_build() -> None:
    # The shape pass is a call like any other (the user's hook runs in it too);
    # the build after it is not one.
    x = torch.randn(2, 4)
    for user_hook in (False, True):
        log: list[str] = []
        layer = DeferredLogged(log=log)
        if user_hook:
            layer.register_forward_hook(lambda m, a, o, log=log: log.append("user post"))
        di.build(layer, x)
        layer(x)
        assert log.count("pre") == log.count("post") == 2
        assert log.count("user post") == (2 if user_hook else 0)


def test_a_failing_own_pre_hook_on_the_building_call_leaves_the_layer_unbuilt() -> None:
    class Failing(Counted):
        def _before(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
            raise ValueError("own pre-hook refused")

    layer = di.defer(Failing, in_features=di.dim(-1))()
    with pytest.raises(ValueError, match="own pre-hook refused"):
        layer(torch.randn(2, 4))
    assert not isinstance(layer, Failing)


# Dynamo probes ``hasattr(t, "grad")`` on the non-leaf tensors it hands back to
# Python at the graph break; torch hides that warning with its own showwarning
# filter, which a warnings-as-errors run bypasses.
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)
@pytest.mark.parametrize("user_hooks", [False, True], ids=["alone", "with_user_hooks"])
def test_own_hooks_run_once_on_the_building_call_under_torch_compile(user_hooks: bool) -> None:
    x = torch.randn(2, 4)
    log: list[str] = []
    layer = DeferredLogged(log=log)
    if user_hooks:
        layer.register_forward_hook(lambda m, a, o: None)
    compiled = torch.compile(layer, backend="eager")
    compiled(x)
    assert log == ["pre", "post"]
    compiled(x)
    assert log == ["pre", "post"] * 2
