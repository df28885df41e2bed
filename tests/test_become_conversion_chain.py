"""Conversions before the build that lose precision on the way (``.half().float()``)
carry over as eager's do after construction (DESIGN §3.2: the eager layer
constructed and then moved the same way): the built tensors are rounded through
every dtype the placeholders were converted through, not only put in the last."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
Move = Callable[[nn.Module], nn.Module]

MOVES: dict[str, Move] = {
    "half().float()": lambda m: m.half().float(),
    "half().double()": lambda m: m.half().double(),
    "bfloat16().half().float()": lambda m: m.bfloat16().half().float(),
    "to(float16).to(float32)": lambda m: m.to(torch.float16).to(torch.float32),
    "type(float16).type(float32)": lambda m: m.type(torch.float16).type(torch.float32),
    "double().float()": lambda m: m.double().float(),
    "double().half().double()": lambda m: m.double().half().double(),
}
LOSSY = {k: v for k, v in MOVES.items() if k != "double().float()"}


def _pair(move: Move) -> tuple[nn.Module, nn.Module]:
    deferred = move(nn.Sequential(dnn.Linear(64), nn.ReLU(), dnn.BatchNorm1d()))
    torch.manual_seed(0)
    eager = move(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.BatchNorm1d(64)))
    return deferred, eager


def _x(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    return torch.rand(4, 20, dtype=p.dtype, device=p.device)


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_first_forward_after_lossy_conversions_equals_eager(
    move: Move, assert_same_state: AssertSameState
) -> None:
    deferred, eager = _pair(move)
    x = _x(deferred)
    torch.manual_seed(0)
    deferred.eval()(x)
    assert_same_state(deferred, eager)


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_di_build_after_lossy_conversions_equals_eager(
    move: Move, assert_same_state: AssertSameState
) -> None:
    deferred, eager = _pair(move)
    x = _x(deferred)
    torch.manual_seed(0)
    di.build(deferred, x)
    assert_same_state(deferred, eager)


def test_the_probe_case_half_then_float_is_rounded() -> None:
    x = torch.rand(2, 20)
    layer = dnn.Linear(64)
    nn.Sequential(layer).half().float()
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    eager = nn.Linear(20, 64).half().float()
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, eager.weight)
    torch.manual_seed(0)
    assert not torch.equal(layer.weight, nn.Linear(20, 64).weight)  # rounded, as eager


def test_a_block_with_placeholders_made_at_declaration_is_rounded_too(
    assert_same_state: AssertSameState,
) -> None:
    q = torch.rand(5, 2, 8)
    deferred = dnn.MultiheadAttention(num_heads=2).half().float()
    torch.manual_seed(0)
    deferred(q, q, q)
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(8, 2).half().float()
    assert_same_state(deferred, eager)


@pytest.mark.parametrize(
    "copier",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_copies_made_before_the_build_keep_the_dtypes_passed_through(
    copier: Callable[[nn.Module], nn.Module], assert_same_state: AssertSameState
) -> None:
    deferred, eager = _pair(MOVES["half().float()"])
    deferred = copier(deferred)
    x = _x(deferred)
    torch.manual_seed(0)
    deferred.eval()(x)
    assert_same_state(deferred, eager)


def test_a_state_dict_of_placeholders_loads_with_weights_only() -> None:
    net = nn.Sequential(dnn.Linear(8)).half().float()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    assert list(torch.load(buffer, weights_only=True)) == ["0.weight", "0.bias"]


def test_a_failed_build_keeps_the_dtypes_passed_through(
    assert_same_state: AssertSameState,
) -> None:
    net = nn.Sequential(dnn.Linear(64)).half().float()
    net[0].register_forward_hook(_fail_once())  # its failure undoes the build
    x = torch.rand(2, 20)
    with pytest.raises(RuntimeError, match="hook fails"):
        net(x)
    assert not di.is_built(net)
    torch.manual_seed(0)
    net(x)
    torch.manual_seed(0)
    assert_same_state(net, nn.Sequential(nn.Linear(20, 64)).half().float())


def _fail_once() -> Callable[..., None]:
    calls = []

    def hook(*_: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("hook fails")

    return hook


def test_lossless_round_trips_leave_nothing_to_round() -> None:
    layer = dnn.Linear(4)
    layer.double().float().double().float()
    assert layer.weight.dtype == torch.float32
    x = torch.rand(2, 3)
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer.weight, nn.Linear(3, 4).weight)


@pytest.mark.parametrize("move", LOSSY.values(), ids=LOSSY.keys())
def test_built_on_meta_then_materialized_equals_eager(
    move: Move, assert_same_state: AssertSameState
) -> None:
    deferred, eager = _pair(move)
    di.build(deferred, _x(deferred), device="meta")
    torch.manual_seed(0)
    di.materialize(deferred)
    assert_same_state(deferred, eager)
