"""A MultiheadAttention twin whose inferred kdim/vdim differ from embed_dim builds
q/k/v_proj_weight, names its placeholders (laid out with in_proj_weight) do not
have. Conversions made before the build (``.double()``, ``requires_grad_(False)``,
``.half().float()``) reach them as eager's conversion after construction would:
they take what the layer's placeholders took (docs/decisions.md, MultiheadAttention
with kdim/vdim different from embed_dim)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
Move = Callable[[nn.Module], nn.Module]

Q, K, V = torch.rand(5, 2, 8), torch.rand(4, 2, 6), torch.rand(4, 2, 10)

MOVES: dict[str, Move] = {
    "requires_grad_(False)": lambda m: m.requires_grad_(False),
    "double()": lambda m: m.double(),
    "half().float()": lambda m: m.half().float(),
    "bfloat16().double()": lambda m: m.bfloat16().double(),
    "to(float64).requires_grad_(False)": lambda m: m.to(torch.float64).requires_grad_(False),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_cross_attention_built_after_a_conversion_equals_eager_converted(
    move: Move, assert_same_state: AssertSameState
) -> None:
    deferred = move(dnn.MultiheadAttention(num_heads=2))
    dtype = next(deferred.parameters()).dtype
    torch.manual_seed(0)
    deferred(Q.to(dtype), K.to(dtype), V.to(dtype))
    torch.manual_seed(0)
    eager = move(nn.MultiheadAttention(8, 2, kdim=6, vdim=10))
    assert_same_state(deferred, eager)
    assert {n for n, _ in deferred.named_parameters()} >= {"q_proj_weight", "v_proj_weight"}


def test_cross_attention_built_by_di_build_after_double_equals_eager(
    assert_same_state: AssertSameState,
) -> None:
    net = nn.Sequential(dnn.MultiheadAttention(num_heads=2)).double()
    torch.manual_seed(0)
    di.build(net[0], Q.double(), K.double(), V.double())
    torch.manual_seed(0)
    eager = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=6, vdim=10)).double()
    assert_same_state(net, eager)


def test_explicit_kdim_equal_to_embed_dim_builds_in_proj_weight_converted(
    assert_same_state: AssertSameState,
) -> None:
    deferred = dnn.MultiheadAttention(num_heads=2, kdim=8, vdim=8).double().requires_grad_(False)
    x = torch.rand(5, 2, 8, dtype=torch.float64)
    torch.manual_seed(0)
    deferred(x, x, x)
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(8, 2, kdim=8, vdim=8).double().requires_grad_(False)
    assert_same_state(deferred, eager)


def test_cross_attention_built_on_meta_after_double_has_float64_on_meta() -> None:
    layer = dnn.MultiheadAttention(num_heads=2).double().requires_grad_(False)
    di.build(layer, Q.double(), K.double(), V.double(), device="meta")
    assert all(p.is_meta and p.dtype == torch.float64 for p in layer.parameters())
    assert not any(p.requires_grad for p in layer.parameters())


def test_placeholders_converted_differently_leave_the_fresh_tensors_as_constructed() -> None:
    layer = dnn.MultiheadAttention(num_heads=2)
    layer.in_proj_weight.requires_grad_(False)  # only one placeholder: no common flag
    torch.manual_seed(0)
    layer(Q, K, V)
    assert layer.q_proj_weight.requires_grad and layer.in_proj_bias.requires_grad


def test_cross_attention_built_on_meta_after_double_materializes_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.MultiheadAttention(num_heads=2).double().requires_grad_(False)
    di.build(layer, Q.double(), K.double(), V.double(), device="meta")
    torch.manual_seed(0)
    di.materialize(layer)
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(8, 2, kdim=6, vdim=10).double().requires_grad_(False)
    assert_same_state(layer, eager)


def test_cross_attention_built_on_meta_after_half_float_materializes_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    layer = dnn.MultiheadAttention(num_heads=2).half().float()
    di.build(layer, Q, K, V, device="meta")
    torch.manual_seed(0)
    di.materialize(layer)
    torch.manual_seed(0)
    assert_same_state(layer, nn.MultiheadAttention(8, 2, kdim=6, vdim=10).half().float())
