"""``di.defer`` on a user's own module classes."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di

AssertSameState = Callable[[nn.Module, nn.Module], None]


class Residual(nn.Module):
    """A pre-norm residual MLP block: x + fc2(relu(fc1(norm(x))))."""

    def __init__(self, dim: int, hidden: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.drop(self.fc2(torch.relu(self.fc1(self.norm(x)))))
        return out  # (B, dim)


class Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.relu(self.proj(x))
        return out


class CrossAttend(nn.Module):
    """Reads its context size from a keyword forward argument."""

    def __init__(self, dim: int, context_dim: int, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.attn(x, context, context, need_weights=False)[0]
        return out  # (L, B, dim)


class Concat(nn.Module):
    """Projects [x, x]: its input size is twice the input's last size."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(torch.cat([x, x], dim=-1))  # (B, 2 * features)
        return out  # (B, out_dim)


LazyResidual = di.defer(Residual, dim=di.dim(-1))
LazyBlock = di.defer(Block, in_dim=di.dim(-1))
LazyCrossAttend = di.defer(CrossAttend, dim=di.dim(-1), context_dim=di.dim(-1, arg="context"))
LazyConcat = di.defer(Concat, in_dim=lambda x: 2 * x.shape[-1])


# --- a block with submodules ---------------------------------------------------------


def test_deferred_residual_block_equals_eager_bitwise(assert_same_state: AssertSameState) -> None:
    x = torch.randn(4, 6)
    torch.manual_seed(0)
    block: nn.Module = LazyResidual(16)
    out = block(x)
    torch.manual_seed(0)
    eager = Residual(6, 16)
    assert type(block) is Residual
    assert repr(block) == repr(eager)
    assert_same_state(block, eager)
    assert torch.equal(out, eager(x))


def test_deferred_block_lists_every_state_dict_key_before_build() -> None:
    block = LazyResidual(16)
    assert list(block.state_dict()) == list(Residual(6, 16).state_dict())
    assert all(isinstance(p, nn.UninitializedParameter) for p in block.parameters())


def test_optimizer_made_before_build_trains_the_built_block() -> None:
    block = LazyResidual(8)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    block(torch.randn(3, 5)).sum().backward()
    optimizer.step()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in block.parameters()}
    assert block.get_parameter("fc1.weight").shape == (8, 5)


def test_residual_block_in_sequential_builds_in_order() -> None:
    net = nn.Sequential(LazyResidual(8), nn.Linear(5, 5), LazyResidual(4))
    net(torch.randn(2, 5))
    assert [type(m) for m in net] == [Residual, nn.Linear, Residual]
    assert di.is_built(net)


def test_changed_size_after_build_raises_shape_mismatch_naming_the_block() -> None:
    net = nn.Sequential(nn.Identity(), LazyResidual(8))
    net(torch.randn(2, 5))
    with pytest.raises(
        di.ShapeMismatchError, match=r"Residual layer '1' was built for dim=5 .*would need dim=7"
    ):
        net(torch.randn(2, 7))


# --- repr, identity, arguments ------------------------------------------------------------


def test_repr_shows_unknown_sizes_as_question_marks() -> None:
    assert repr(LazyBlock(out_dim=64)) == "Block(in_dim=?, out_dim=64)"
    assert repr(LazyBlock(64)) == "Block(in_dim=?, out_dim=64)"  # positions skip in_dim
    assert repr(LazyResidual(16, dropout=0.5)) == "Residual(dim=?, hidden=16, dropout=0.5)"


def test_type_after_build_is_the_users_class_and_the_object_is_kept() -> None:
    block = LazyBlock(out_dim=64)
    assert isinstance(block, di.Deferred) and not isinstance(block, Block)
    same = block
    block(torch.randn(2, 3))
    built: nn.Module = block
    assert type(built) is Block
    assert id(built) == id(same)
    assert built.get_parameter("proj.weight").shape == (64, 3)


def test_inferred_argument_given_by_keyword_builds_at_once() -> None:
    block: nn.Module = LazyBlock(8, in_dim=3)
    assert type(block) is Block
    assert block.get_parameter("proj.weight").shape == (8, 3)


def test_defer_is_cached_and_the_class_pickles() -> None:
    assert di.defer(Block, in_dim=di.dim(-1)) is LazyBlock
    block = LazyBlock(out_dim=4)
    for copied in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert repr(copied) == "Block(in_dim=?, out_dim=4)"
        copied(torch.randn(1, 3))
        assert type(copied) is Block


def test_wrong_constructor_arguments_raise_type_error_naming_the_class() -> None:
    with pytest.raises(TypeError, match=r"deferinit Block: .*except the inferred 'in_dim'"):
        LazyBlock(4, 5, 6)


# --- size from a keyword forward argument ---------------------------------------------------


def test_size_from_keyword_forward_argument(assert_same_state: AssertSameState) -> None:
    x, context = torch.randn(5, 2, 8), torch.randn(7, 2, 3)
    torch.manual_seed(0)
    layer: nn.Module = LazyCrossAttend(heads=4)
    assert repr(layer) == "CrossAttend(dim=?, context_dim=?, heads=4)"
    out = layer(x, context=context)
    torch.manual_seed(0)
    eager = CrossAttend(8, 3, heads=4)
    assert type(layer) is CrossAttend
    assert_same_state(layer, eager)
    assert torch.equal(out, eager(x, context=context))


def test_missing_keyword_forward_argument_is_inference_error() -> None:
    layer: nn.Module = LazyCrossAttend()
    with pytest.raises(
        di.InferenceError,
        match=r"CrossAttend layer cannot infer context_dim .*forward argument 'context'",
    ):
        layer(torch.randn(5, 2, 8))
    assert di.pending(layer) == [""]
    layer(torch.randn(5, 2, 8), context=torch.randn(7, 2, 3))
    assert type(layer) is CrossAttend


def test_named_rule_also_finds_an_argument_passed_by_position() -> None:
    class Pair(nn.Module):
        def __init__(self, a: int, b: int) -> None:
            super().__init__()
            self.bilinear = nn.Bilinear(a, b, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bilinear(x, y)
            return out

    lazy = di.defer(Pair, a=di.dim(-1, arg="x"), b=di.dim(-1, arg="y"))
    layer = lazy()
    layer(torch.randn(2, 3), torch.randn(2, 5))
    assert isinstance(layer, Pair)
    assert (layer.bilinear.in1_features, layer.bilinear.in2_features) == (3, 5)


# --- callable rules -------------------------------------------------------------------


def test_callable_rule_gives_a_derived_size(assert_same_state: AssertSameState) -> None:
    x = torch.randn(3, 5)
    torch.manual_seed(0)
    layer: nn.Module = LazyConcat(4)
    assert repr(layer) == "Concat(in_dim=?, out_dim=4)"
    out = layer(x)
    torch.manual_seed(0)
    eager = Concat(10, 4)
    assert type(layer) is Concat
    assert layer.get_parameter("proj.weight").shape == (4, 10)
    assert_same_state(layer, eager)
    assert torch.equal(out, eager(x))


def test_error_in_callable_rule_is_inference_error_naming_the_layer() -> None:
    lazy = di.defer(Block, in_dim=lambda x: x.shape[5])
    net = nn.Sequential(nn.Identity(), lazy(out_dim=2))
    with pytest.raises(
        di.InferenceError, match=r"Block layer '1' cannot infer in_dim .*IndexError"
    ):
        net(torch.randn(2, 3))
    assert isinstance(net[1], di.Deferred)


def test_callable_rule_returning_a_non_positive_size_is_inference_error() -> None:
    lazy = di.defer(Block, in_dim=lambda x: x.shape[-1] if x.shape[0] > 1 else 0)
    layer = lazy(out_dim=2)
    with pytest.raises(
        di.InferenceError, match=r"Block layer cannot infer in_dim .*a positive size from the rule"
    ):
        layer(torch.randn(1, 3))
    assert isinstance(layer, di.Deferred)
    layer(torch.randn(2, 3))
    assert isinstance(layer, Block) and layer.proj.in_features == 3


def test_dim_rule_on_too_few_dimensions_is_inference_error() -> None:
    block = LazyBlock(out_dim=2)
    with pytest.raises(
        di.InferenceError, match=r"Block layer cannot infer in_dim .*at least 1 dimension"
    ):
        block(torch.tensor(1.0))
    assert isinstance(block, di.Deferred)


# --- bad use of di.defer --------------------------------------------------------------


def test_unknown_rule_name_raises_type_error_listing_the_arguments() -> None:
    with pytest.raises(
        TypeError,
        match=r"di\.defer\(Block\): 'in_features' not a constructor argument of Block; "
        r"its arguments are .*in_dim",
    ):
        di.defer(Block, in_features=di.dim(-1))


def test_rule_that_is_not_a_rule_raises_type_error() -> None:
    bad: Any = 3
    with pytest.raises(TypeError, match=r"a deferinit rule must be di\.dim\(axis, arg=\.\.\.\)"):
        di.defer(Block, in_dim=bad)


def test_defer_without_rules_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"di\.defer\(Block\) needs at least one rule"):
        di.defer(Block)


def test_defer_of_a_non_module_raises_type_error() -> None:
    bad: Any = dict
    with pytest.raises(TypeError, match=r"di\.defer expects an nn\.Module class"):
        di.defer(bad, x=di.dim(0))


def test_defer_of_a_deferred_class_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"Block is already deferred; defer the original class"):
        di.defer(LazyBlock, in_dim=di.dim(-1))


def test_constructor_rejecting_provisional_sizes_reports_the_arguments() -> None:
    with pytest.raises(TypeError, match=r"deferinit Block\(in_dim=\?, out_dim=-1\)"):
        LazyBlock(out_dim=-1)


def test_a_rule_returning_a_tensor_is_refused_and_the_layer_left_unbuilt() -> None:
    class Mix(nn.Module):
        def __init__(self, a: int, b: int, out: int = 3) -> None:
            super().__init__()
            self.lin = nn.Linear(a + b, out)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.lin(torch.cat([x, y], -1))
            return out

    lazy = di.defer(
        Mix, a=di.dim(-1), b=lambda x, y: y.shape[-1] * torch.ones((), dtype=torch.long)
    )
    block = lazy()
    with pytest.raises(di.InferenceError, match=r"cannot infer b.*not a tensor.*Fix"):
        block(torch.randn(2, 3), torch.randn(2, 5))
    assert di.pending(block) == [""]
