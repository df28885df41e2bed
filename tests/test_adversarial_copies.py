"""Copies under adversarial use (docs/design.md §3.7): ``copy.deepcopy`` and ``pickle`` of
every twin (``deferinit.nn.TWINS``, through test_layers' table), before and after its
build, of nested deferred models and of models with ties. A copy is a separate
model: building it leaves the original deferred with the same placeholder objects,
writing to one never changes the other, and an unbuilt copy builds to the eager
model's values under the same seed.

test_copies.py covers a few hand-picked models; this file goes through them all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

import deferinit as di
from deferinit import nn as dnn
from test_copies import Copier, pickled
from test_layers import CASES, Case, assert_same, eager, twin

AssertSameState = Callable[[nn.Module, nn.Module], None]

COPIERS = [pytest.param(copy.deepcopy, id="deepcopy"), pytest.param(pickled, id="pickle")]
TWIN_CASES = [pytest.param(c, id=c.id, marks=c.marks) for c in CASES]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _snapshot(module: nn.Module) -> list[tuple[torch.Tensor, type]]:
    """Every tensor object of ``module`` and its class, to check nothing changed."""
    return [(t, type(t)) for t in _tensors(module)]


def _assert_untouched(module: nn.Module, before: list[tuple[torch.Tensor, type]]) -> None:
    after = _snapshot(module)
    assert len(after) == len(before)
    for (t, cls), (u, ucls) in zip(after, before, strict=True):
        assert t is u and cls is ucls


def _assert_disjoint(a: nn.Module, b: nn.Module) -> None:
    """No tensor object and no storage of ``a`` is ``b``'s."""
    ids = {id(t) for t in _tensors(b)}
    storages = {
        t.untyped_storage().data_ptr()
        for t in _tensors(b)
        if not isinstance(t, UninitializedTensorMixin) and t.numel() and t.device.type != "meta"
    }
    for t in _tensors(a):
        assert id(t) not in ids
        if not isinstance(t, UninitializedTensorMixin) and t.numel() and t.device.type != "meta":
            assert t.untyped_storage().data_ptr() not in storages


def _bump(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key


# --- every twin -----------------------------------------------------------------------


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("case", TWIN_CASES)
def test_unbuilt_copy_of_every_twin_builds_as_eager_and_leaves_the_original_deferred(
    case: Case, copier: Copier, assert_same_state: AssertSameState
) -> None:
    args = case.inputs()
    layer = twin(case)
    before = _snapshot(layer)
    copied = copier(layer)
    _assert_disjoint(copied, layer)
    torch.manual_seed(0)
    out = copied(*args)
    torch.manual_seed(0)
    reference = eager(case)
    expected = reference(*args)  # before comparing: a training forward moves running stats
    assert type(copied) is case.cls
    assert_same_state(copied, reference)
    assert_same(out, expected)
    if case.inferred:
        assert isinstance(layer, di.Deferred) and di.pending(layer) == [""]
        _assert_untouched(layer, before)
    # The original builds on its own, to the same values, sharing nothing.
    torch.manual_seed(0)
    layer(*args)
    torch.manual_seed(0)
    reference = eager(case)
    reference(*args)
    assert_same_state(layer, reference)
    _assert_disjoint(copied, layer)


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("case", TWIN_CASES)
def test_built_copy_of_every_twin_is_independent_and_keeps_the_mismatch_check(
    case: Case, copier: Copier, assert_same_state: AssertSameState
) -> None:
    args = case.inputs()
    torch.manual_seed(0)
    layer = twin(case)
    layer(*args)
    copied = copier(layer)
    assert type(copied) is case.cls
    assert_same_state(copied, layer)
    _assert_disjoint(copied, layer)
    layer.eval()
    copied.eval()
    assert_same(copied(*args), layer(*args))
    original = _state(layer)
    _bump(copied)
    _assert_state_equal(layer, original)
    if case.changed is not None:
        with pytest.raises(di.ShapeMismatchError, match=case.changed_arg):
            copied(*case.changed())


# --- nested models ----------------------------------------------------------------------


class Block(nn.Module):
    """A user block holding deferred twins: deferred itself, its children too."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(dnn.Linear(width), nn.Tanh(), dnn.LayerNorm())
        self.out = dnn.Linear(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))  # type: ignore[no-any-return]


class EagerBlock(nn.Module):
    def __init__(self, dim: int, width: int, out: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.LayerNorm(width))
        self.out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))  # type: ignore[no-any-return]


class Carrier(nn.Module):
    """``Block`` made deferrable on a size it only passes on (``dim`` is unused by
    the block itself, so the deferred form stands for a module of deferred parts)."""

    def __init__(self, dim: int, width: int, out: int) -> None:
        super().__init__()
        self.dim = dim
        self.block = Block(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # type: ignore[no-any-return]


DeferredCarrier = di.defer(Carrier, dim=di.dim(-1))


def nested() -> nn.Sequential:
    return nn.Sequential(
        nn.ModuleDict({"stem": nn.Sequential(dnn.Linear(8), nn.ReLU())}),
        DeferredCarrier(width=6, out=5),
        nn.Sequential(Block(4, 3)),
    )


def nested_forward(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    stem = model[0]["stem"]  # type: ignore[index]
    return model[2](model[1](stem(x)))  # type: ignore[no-any-return]


class NestedModel(nn.Module):
    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nested_forward(self.body, x)


def eager_nested(dim: int) -> nn.Module:
    return NestedModel(
        nn.Sequential(
            nn.ModuleDict({"stem": nn.Sequential(nn.Linear(dim, 8), nn.ReLU())}),
            EagerCarrier(8, 6, 5),
            nn.Sequential(EagerBlock(5, 4, 3)),
        )
    )


class EagerCarrier(nn.Module):
    def __init__(self, dim: int, width: int, out: int) -> None:
        super().__init__()
        self.block = EagerBlock(dim, width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # type: ignore[no-any-return]


def _values(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in model.state_dict().values()]


@pytest.mark.parametrize("copier", COPIERS)
def test_unbuilt_copy_of_a_nested_model_builds_as_eager_and_the_original_stays_deferred(
    copier: Copier,
) -> None:
    model = NestedModel(nested())
    pending = di.pending(model)
    before = _snapshot(model)
    copied = copier(model)
    x = torch.randn(2, 7)
    torch.manual_seed(0)
    out = copied(x)
    torch.manual_seed(0)
    reference = eager_nested(7)
    assert torch.equal(out, reference(x))
    assert di.is_built(copied)
    got, want = _values(copied), _values(reference)
    assert len(got) == len(want)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert di.pending(model) == pending and pending
    _assert_untouched(model, before)
    # The original infers its own sizes from a different input.
    model(torch.randn(2, 11))
    assert model.body[0]["stem"][0].in_features == 11  # type: ignore[index]
    assert copied.body[0]["stem"][0].in_features == 7  # type: ignore[index]
    _assert_disjoint(copied, model)


@pytest.mark.parametrize("copier", COPIERS)
def test_copy_of_a_partly_built_nested_model_keeps_which_layers_are_built(
    copier: Copier,
) -> None:
    model = NestedModel(nested())
    model.body[0]["stem"](torch.randn(2, 7))  # type: ignore[index]
    pending = di.pending(model)
    assert pending and "body.0.stem.0" not in pending
    copied = copier(model)
    assert di.pending(copied) == pending
    _assert_disjoint(copied, model)
    copied(torch.randn(2, 7))
    assert di.is_built(copied) and di.pending(model) == pending
    with pytest.raises(di.ShapeMismatchError, match="body.0.stem.0"):
        copied(torch.randn(2, 9))


@pytest.mark.parametrize("copier", COPIERS)
def test_built_nested_copy_trains_without_changing_the_original(copier: Copier) -> None:
    model = NestedModel(nested())
    x = torch.randn(4, 7)
    model(x)
    copied = copier(model)
    original = _state(model)
    optimizer = torch.optim.SGD(copied.parameters(), lr=0.5)
    copied(x).square().mean().backward()
    optimizer.step()
    _assert_state_equal(model, original)
    trained = zip(_values(copied), original.values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in trained)
    assert all(p.grad is None for p in model.parameters())


def test_copy_after_reset_builds_with_new_sizes_and_the_original_stays_reset() -> None:
    model = NestedModel(nested())
    model(torch.randn(2, 7))
    di.reset(model)
    pending = di.pending(model)
    assert pending
    for copier in (copy.deepcopy, pickled):
        copied = copier(model)
        copied(torch.randn(2, 13))
        assert copied.body[0]["stem"][0].in_features == 13  # type: ignore[index]
        assert di.pending(model) == pending


# --- ties -----------------------------------------------------------------------------


def shared_model() -> nn.Sequential:
    shared = dnn.Linear(6)
    return nn.Sequential(shared, nn.ReLU(), shared)


@pytest.mark.parametrize("copier", COPIERS)
@pytest.mark.parametrize("built", [False, True], ids=["unbuilt", "built"])
def test_a_layer_used_twice_stays_one_layer_in_the_copy_and_only_there(
    copier: Copier, built: bool
) -> None:
    model = shared_model()
    x = torch.randn(3, 6)
    if built:
        model(x)
    copied = copier(model)
    assert copied[0] is copied[2] and copied[0] is not model[0]
    assert copied[0].weight is copied[2].weight
    out = copied(x)
    assert copied[0] is copied[2]
    if not built:
        assert isinstance(model[0], di.Deferred)
        torch.manual_seed(0)
        copied = copier(model)
        out = copied(x)
        torch.manual_seed(0)
        lin = nn.Linear(6, 6)
        assert torch.equal(out, lin(torch.relu(lin(x))))
    assert len(list(copied.parameters())) == 2


class TiedLM(nn.Module):
    """An embedding and a deferred head tied after the head's build."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = dnn.Linear(10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))  # type: ignore[no-any-return]


@pytest.mark.parametrize("copier", COPIERS)
def test_a_tie_made_after_build_is_one_parameter_in_the_copy_and_not_the_originals(
    copier: Copier,
) -> None:
    model = TiedLM()
    ids = torch.tensor([[1, 2, 3]])
    model(ids)
    model.head.weight = model.emb.weight
    copied = copier(model)
    assert copied.head.weight is copied.emb.weight
    assert copied.emb.weight is not model.emb.weight
    assert sum(p.numel() for p in copied.parameters()) == 40
    with torch.no_grad():
        copied.emb.weight.zero_()
    assert bool(model.emb.weight.abs().sum() > 0)
    assert torch.equal(copied(ids), torch.zeros(1, 3, 10))


# --- forward hooks go with the copy --------------------------------------------------


CALLS: list[str] = []


def record_call(module: nn.Module, args: Any, output: Any) -> None:
    CALLS.append(type(module).__name__)


@pytest.mark.parametrize("copier", COPIERS)
def test_a_hook_registered_before_build_runs_once_per_call_on_the_copy(copier: Copier) -> None:
    layer = dnn.Linear(3)
    layer.register_forward_hook(record_call)
    copied = copier(layer)
    CALLS.clear()
    copied(torch.randn(2, 4))
    copied(torch.randn(2, 4))
    assert CALLS == ["Linear", "Linear"]
    assert isinstance(layer, di.Deferred)
    CALLS.clear()


@pytest.mark.parametrize("copier", COPIERS)
def test_a_tie_made_before_build_survives_the_copy_and_binds_only_the_copy(
    copier: Copier,
) -> None:
    model = TiedLM()
    model.head.weight = model.emb.weight  # the language-model idiom, before the head builds
    copied = copier(model)
    assert copied.head.weight is copied.emb.weight
    assert copied.emb.weight is not model.emb.weight
    ids = torch.tensor([[1, 2, 3]])
    copied(ids)
    assert copied.head.weight is copied.emb.weight
    assert copied.head.in_features == 4
    assert sum(p.numel() for p in copied.parameters()) == 40
    assert isinstance(model.head, di.Deferred)
    assert model.head.weight is model.emb.weight
