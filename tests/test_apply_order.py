"""Init code waiting on a deferred layer runs in program order (docs/design.md §3.3):
functions given to ``Module.apply`` and in-place calls on placeholders, interleaved,
and a checkpoint's build runs the applied functions before writing its values."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def init_constant(m: nn.Module) -> None:
    if type(m) == nn.Linear:  # noqa: E721 - as user code tests it
        nn.init.constant_(m.weight, 1)
        nn.init.zeros_(m.bias)


def freeze(m: nn.Module) -> None:
    if type(m) == nn.Linear:  # noqa: E721
        m.weight.requires_grad_(False)


def fail(m: nn.Module) -> None:
    if type(m) == nn.Linear:  # noqa: E721
        raise ValueError("no")


def _declared() -> Any:
    net: Any = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(1))
    net.apply(init_constant)
    net[0].weight.data.mul_(3)
    nn.init.constant_(net[0].bias, 7.0)
    return net


def _eager() -> Any:
    net: Any = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    net.apply(init_constant)
    net[0].weight.data.mul_(3)
    nn.init.constant_(net[0].bias, 7.0)
    return net


def _same(net: nn.Module, eager: nn.Module) -> None:
    for (k, a), (_, b) in zip(net.state_dict().items(), eager.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_in_place_after_apply_runs_after_it_on_first_forward() -> None:
    net: Any = _declared()
    net(torch.rand(2, 4))
    _same(net, _eager())


def test_in_place_before_apply_runs_before_it() -> None:
    net: Any = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(1))
    net[0].weight.data.mul_(3)
    net.apply(init_constant)
    net(torch.rand(2, 4))
    assert torch.equal(net[0].weight, torch.ones(8, 4))


def test_order_kept_by_build_and_seeded_materialize() -> None:
    net: Any = di.build(_declared(), torch.rand(2, 4))
    _same(net, _eager())
    meta = di.build(_declared(), torch.rand(2, 4), device="meta")
    di.materialize(meta)
    _same(meta, _eager())
    seeded = di.build(_declared(), torch.rand(2, 4), device="meta")
    di.materialize(seeded, seed=3)
    _same(seeded, _eager())


def test_order_kept_by_copies() -> None:
    made: Any
    for made in (copy.deepcopy(_declared()), pickle.loads(pickle.dumps(_declared()))):
        made(torch.rand(2, 4))
        _same(made, _eager())


def test_order_kept_by_recorded_twins() -> None:
    net: Any = di.deferred_init(lambda: nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(1)))
    net.apply(init_constant)
    net[0].weight.data.mul_(3)
    nn.init.constant_(net[0].bias, 7.0)
    di.build(net, torch.rand(2, 4), device="meta")
    di.materialize(net)
    _same(net, _eager())


def test_reset_keeps_applied_functions_and_drops_in_place_calls() -> None:
    net: Any = _declared()
    net(torch.rand(2, 4))
    di.reset(net)
    net(torch.rand(2, 4))
    assert torch.equal(net[0].weight, torch.ones(8, 4))
    assert torch.equal(net[0].bias, torch.zeros(8))


def _checkpoint() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict()


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_checkpoint_build_runs_applied_functions_before_its_values(loader: str) -> None:
    sd = _checkpoint()
    net: Any = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    net.apply(freeze)
    net.apply(init_constant)
    net[0].weight.data.mul_(3)
    if loader == "di":
        di.load_state_dict(net, sd)
    else:
        net.load_state_dict(sd)
    eager = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    eager.apply(freeze)
    eager.load_state_dict(sd)
    _same(net, eager)
    assert not net[0].weight.requires_grad
    assert not net[2].weight.requires_grad
    assert net[0].bias.requires_grad


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_checkpoint_build_with_failing_function_leaves_model(loader: str) -> None:
    sd = _checkpoint()
    net: Any = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    net.apply(fail)
    with pytest.raises(di.DeferredInitError, match=r"Linear layer '0'.*fail.*ValueError"):
        if loader == "di":
            di.load_state_dict(net, sd)
        else:
            net.load_state_dict(sd)
    assert isinstance(net[0], dnn.Linear)
    assert isinstance(net[2], dnn.Linear)


def test_failing_in_place_call_after_apply_names_layer_and_call() -> None:
    net: Any = nn.Sequential(dnn.Linear(8))
    net.apply(init_constant)
    net[0].bias.data.mul_(torch.ones(3))
    with pytest.raises(di.DeferredInitError, match=r"Linear layer '0'.*mul_ on 'bias'.*match"):
        net(torch.rand(2, 4))
    assert isinstance(net[0], dnn.Linear)


def test_in_place_call_on_a_submodule_tensor_of_a_deferred_layer() -> None:
    def ones(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.ones_(m.weight)

    x = torch.rand(3, 1, 4)
    torch.manual_seed(0)
    layer: Any = dnn.MultiheadAttention(num_heads=2)
    layer.apply(ones)
    layer.out_proj.weight.data.mul_(3)
    layer(x, x, x)
    torch.manual_seed(0)
    eager: Any = nn.MultiheadAttention(4, 2)
    eager.apply(ones)
    eager.out_proj.weight.data.mul_(3)
    _same(layer, eager)
