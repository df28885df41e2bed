"""What a placeholder held besides its own state survives its build and ``di.reset``.

A full backward hook registered on a twin (torch collects ``_backward_hooks`` only
when ``_is_full_backward_hook`` is true), and attributes and submodules a user put
on a placeholder (a declared twin, or an adopted Lazy module), are the user's: the
layer keeps them through the first forward, ``di.build``, a build on meta then
``di.materialize``, and ``di.reset`` followed by a new build.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _forward(layer: nn.Module) -> None:
    layer(torch.randn(2, 4))


def _build(layer: nn.Module) -> None:
    di.build(layer, (2, 4))


def _meta_then_materialize(layer: nn.Module) -> None:
    di.build(layer, (2, 4), device="meta")
    di.materialize(layer)


def _reset_then_rebuild(layer: nn.Module) -> None:
    layer(torch.randn(2, 5))
    di.reset(layer)
    layer(torch.randn(2, 4))


BUILDS: dict[str, Callable[[nn.Module], None]] = {
    "first-forward": _forward,
    "build": _build,
    "meta+materialize": _meta_then_materialize,
    "reset+rebuild": _reset_then_rebuild,
}


def _backward(layer: nn.Module) -> None:
    layer(torch.randn(2, 4, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_a_full_backward_hook_on_a_twin_fires_after_its_build(
    build: Callable[[nn.Module], None],
) -> None:
    calls: list[str] = []
    layer = dnn.Linear(3)
    layer.register_full_backward_hook(lambda m, gi, go: calls.append("hook"))
    build(layer)
    calls.clear()
    _backward(layer)
    assert calls == ["hook"]


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_a_full_backward_hook_on_an_adopted_lazy_module_fires_after_its_build(
    build: Callable[[nn.Module], None],
) -> None:
    calls: list[str] = []
    layer = nn.LazyLinear(3)
    layer.register_full_backward_hook(lambda m, gi, go: calls.append("hook"))
    di.adopt(layer)
    build(layer)
    calls.clear()
    _backward(layer)
    assert calls == ["hook"]


def test_a_removed_full_backward_hook_stays_removed_after_the_build() -> None:
    calls: list[str] = []
    layer = dnn.Linear(3)
    handle = layer.register_full_backward_hook(lambda m, gi, go: calls.append("hook"))
    _forward(layer)
    handle.remove()
    _backward(layer)
    assert calls == []


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_what_a_user_added_to_a_twin_survives_its_build(
    build: Callable[[nn.Module], None],
) -> None:
    layer: nn.Module = dnn.Linear(3)
    extra = nn.ReLU()
    setattr(layer, "tag", "mine")  # noqa: B010 (mypy: Module's __setattr__ types)
    layer.extra = extra
    build(layer)
    assert type(layer) is nn.Linear
    assert layer.__dict__.get("tag") == "mine"
    assert layer._modules.get("extra") is extra
    assert list(layer._modules) == ["extra"]


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_what_a_user_added_to_an_adopted_lazy_module_survives_its_build(
    build: Callable[[nn.Module], None],
) -> None:
    layer = nn.LazyLinear(3)
    extra = nn.ReLU()
    setattr(layer, "tag", "mine")  # noqa: B010
    layer.extra = extra
    di.adopt(layer)
    build(layer)
    assert type(layer) is nn.Linear
    assert layer.__dict__.get("tag") == "mine"
    assert layer._modules.get("extra") is extra


def test_what_a_user_added_to_a_built_layer_survives_reset_and_rebuild() -> None:
    layer = dnn.Linear(3)
    _forward(layer)
    setattr(layer, "tag", "mine")  # noqa: B010
    extra = nn.ReLU()
    layer.extra = extra
    di.reset(layer)
    assert isinstance(layer, dnn.Linear)
    assert layer.__dict__.get("tag") == "mine"
    assert layer._modules.get("extra") is extra
    layer(torch.randn(2, 5))
    assert layer.in_features == 5
    assert layer.__dict__.get("tag") == "mine"
    assert layer._modules.get("extra") is extra


def test_a_reset_forgets_the_built_layers_own_attributes() -> None:
    layer = dnn.Linear(3)
    _forward(layer)
    di.reset(layer)
    assert "in_features" not in layer.__dict__
    assert "forward" not in layer.__dict__


def test_a_user_submodule_beside_a_blocks_own_keeps_registration_order() -> None:
    layer = dnn.TransformerEncoderLayer(2, 8, batch_first=True)
    extra = nn.ReLU()
    layer.extra = extra
    x = torch.randn(2, 3, 4)
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    eager = nn.TransformerEncoderLayer(4, 2, 8, batch_first=True)
    assert list(layer._modules) == [*eager._modules, "extra"]
    assert layer._modules["extra"] is extra
    for (name, ours), (_, theirs) in zip(
        layer.state_dict().items(), eager.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name


def test_a_user_attribute_named_like_the_built_layers_own_refuses_the_build() -> None:
    layer: nn.Module = dnn.Linear(3)
    setattr(layer, "in_features", 4)  # noqa: B010
    before = dict(layer.__dict__)
    weight = layer.weight
    with pytest.raises(di.DeferredInitError, match=r"Linear.*'in_features'.*left unbuilt.*Fix"):
        _forward(layer)
    assert not di.is_built(layer)
    assert layer.__dict__ == before
    assert layer.weight is weight
    del layer.__dict__["in_features"]
    _forward(layer)
    assert type(layer) is nn.Linear


def test_a_user_submodule_named_like_the_built_layers_own_refuses_the_build() -> None:
    layer = dnn.TransformerEncoderLayer(2, 8)
    layer.add_module("extra", nn.ReLU())
    layer._modules["norm1"] = nn.Identity()
    with pytest.raises(di.DeferredInitError, match=r"'norm1'.*left unbuilt.*Fix"):
        layer(torch.randn(3, 2, 4))
    assert isinstance(layer, dnn.TransformerEncoderLayer)
