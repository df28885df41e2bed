"""``di.build`` on shapes builds layers of any dtype (DESIGN §2, §3.10).

A shape says nothing of dtype: the shape-only pass gives it the dtype an eager
user's data would have for the model, that of its first floating parameter in
registration order (a deferred layer's declared one), else torch's default. So
layers declared in float64 (by ``dtype=`` or under a float64 default) build, and
equal the eager layers bitwise under the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
DeclaredIn = Callable[[torch.dtype, Callable[[], nn.Module]], nn.Module]

F64 = torch.float64

# name -> (deferred factory, eager factory, example shapes); both take the dtype keyword.
Case = tuple[Callable[..., nn.Module], Callable[..., nn.Module], tuple[Any, ...]]
CASES: dict[str, Case] = {
    "Linear": (lambda **k: dnn.Linear(4, **k), lambda **k: nn.Linear(3, 4, **k), ((2, 3),)),
    "Conv1d": (
        lambda **k: dnn.Conv1d(4, 3, **k),
        lambda **k: nn.Conv1d(3, 4, 3, **k),
        ((2, 3, 10),),
    ),
    "Conv2d": (
        lambda **k: dnn.Conv2d(4, 3, **k),
        lambda **k: nn.Conv2d(3, 4, 3, **k),
        ((2, 3, 8, 8),),
    ),
    "Conv3d": (
        lambda **k: dnn.Conv3d(4, 3, **k),
        lambda **k: nn.Conv3d(3, 4, 3, **k),
        ((2, 3, 5, 5, 5),),
    ),
    "Conv": (lambda **k: dnn.Conv(4, 3, **k), lambda **k: nn.Conv1d(3, 4, 3, **k), ((2, 3, 10),)),
    "RNN": (lambda **k: dnn.RNN(4, **k), lambda **k: nn.RNN(10, 4, **k), ((2, 3, 10),)),
    "LSTM": (lambda **k: dnn.LSTM(4, **k), lambda **k: nn.LSTM(10, 4, **k), ((2, 3, 10),)),
    "GRU": (lambda **k: dnn.GRU(4, **k), lambda **k: nn.GRU(10, 4, **k), ((2, 3, 10),)),
    "Bilinear": (
        lambda **k: dnn.Bilinear(5, **k),
        lambda **k: nn.Bilinear(3, 4, 5, **k),
        ((2, 3), (2, 4)),
    ),
    "PReLU": (
        lambda **k: dnn.PReLU(per_channel=True, **k),
        lambda **k: nn.PReLU(3, **k),
        ((2, 3, 5),),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_layer_declared_with_dtype_float64_builds_from_shapes_as_eager(
    case: Case, assert_same_state: AssertSameState
) -> None:
    deferred, eager, shapes = case
    torch.manual_seed(0)
    built = di.build(deferred(dtype=F64), *shapes)
    torch.manual_seed(0)
    assert_same_state(built, eager(dtype=F64))
    assert all(p.dtype == F64 for p in built.parameters())


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_layer_declared_under_a_float64_default_builds_from_shapes_as_eager(
    case: Case, assert_same_state: AssertSameState, declared_in: DeclaredIn
) -> None:
    deferred, eager, shapes = case
    torch.manual_seed(0)
    layer = declared_in(F64, deferred)
    built = di.build(layer, *shapes)  # torch's default is float32 again
    torch.manual_seed(0)
    assert_same_state(built, declared_in(F64, eager))


def test_a_float64_default_in_force_at_the_build_builds_too(
    assert_same_state: AssertSameState, declared_in: DeclaredIn
) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return di.build(nn.Sequential(dnn.Conv1d(4, 3), nn.ReLU(), dnn.LSTM(5)), (2, 3, 10))

    def eager() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.LSTM(8, 5))

    assert_same_state(declared_in(F64, build), declared_in(F64, eager))


def _example_dtypes(model: nn.Module, *shapes: Any) -> list[torch.dtype]:
    """The dtype of the example each shape became, seen by the model's forward."""
    seen: list[torch.dtype] = []
    model.register_forward_pre_hook(lambda _m, args: seen.extend(a.dtype for a in args))
    di.build(model, *shapes)
    return seen


def test_the_example_takes_the_first_floating_parameter_in_registration_order() -> None:
    first = nn.Sequential(nn.Linear(3, 4, dtype=F64), dnn.Linear(5, dtype=F64))
    assert _example_dtypes(first, (2, 3)) == [F64]
    later = nn.Sequential(dnn.Linear(4, dtype=F64), nn.Identity(), nn.Sequential(dnn.Linear(3)))
    later[2].register_forward_pre_hook(lambda _m, args: (args[0].float(),))
    assert _example_dtypes(later, (2, 3)) == [F64]


def test_without_floating_parameters_the_example_takes_torch_default_dtype(
    declared_in: DeclaredIn,
) -> None:
    assert _example_dtypes(nn.Sequential(dnn.LayerNorm(elementwise_affine=False)), (2, 3)) == [
        torch.float32
    ]

    def in_float64() -> nn.Module:
        model = nn.Sequential(nn.ReLU(), dnn.LayerNorm(elementwise_affine=False))
        assert _example_dtypes(model, (2, 3)) == [F64]
        return model

    declared_in(F64, in_float64)


def test_tensor_examples_keep_their_own_dtype() -> None:
    seen: list[torch.dtype] = []
    model = nn.Sequential(dnn.Linear(4, dtype=F64))
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    model.register_forward_pre_hook(lambda _m, args: (args[0].double(),))
    di.build(model, torch.empty(2, 3, dtype=torch.float16, device="meta"))
    assert seen == [torch.float16]


def test_double_before_the_build_still_builds_as_eager_converted_after(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    built = di.build(nn.Sequential(dnn.Conv1d(4, 3), nn.ReLU(), dnn.GRU(5)).double(), (2, 3, 10))
    torch.manual_seed(0)
    assert_same_state(built, nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.GRU(8, 5)).double())


def test_a_float64_layer_builds_on_meta_then_materializes_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    model = di.build(nn.Sequential(dnn.Conv2d(4, 3, dtype=F64)), (2, 3, 8, 8), device="meta")
    assert all(p.is_meta and p.dtype == F64 for p in model.parameters())
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert_same_state(model, nn.Sequential(nn.Conv2d(3, 4, 3, dtype=F64)))
