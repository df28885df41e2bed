"""Ties made before the build survive it (docs/design.md §3.10): a real parameter assigned to
a deferred layer (the language-model head ``head.weight = emb.weight``) is kept and
fixes the sizes it determines; two deferred layers tied before the build are one
parameter after it; ``di.reset`` never empties a tensor deferinit did not create.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

V, D = 40, 16  # vocabulary, width


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens() -> torch.Tensor:
    return torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))


def eager_lm() -> nn.Sequential:
    emb = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, head)


def deferred_lm() -> nn.Sequential:
    emb = nn.Embedding(V, D)
    head = dnn.Linear(V, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, head)


@pytest.mark.parametrize("how", ["first forward", "di.build", "di.build on meta"])
def test_lm_head_keeps_the_embedding_weight_and_equals_eager(how: str) -> None:
    x = tokens()
    torch.manual_seed(0)
    model = deferred_lm()
    if how == "di.build":
        di.build(model, x)
    elif how == "di.build on meta":
        di.build(model, x, device="meta")
        di.materialize(model)
    out = model(x)
    torch.manual_seed(0)
    reference = eager_lm()
    assert model[1].weight is model[0].weight
    assert model[1].in_features == D
    assert numel(model) == numel(reference) == V * D
    assert torch.equal(out, reference(x))
    assert list(model.state_dict()) == list(reference.state_dict())


def test_lm_head_tie_survives_a_meta_build_and_materialize() -> None:
    model = deferred_lm()
    emb = model[0].weight
    di.build(model, torch.empty(2, 5, dtype=torch.long, device="meta"), device="meta")
    assert model[1].weight is emb and not emb.is_meta
    assert numel(model) == V * D


def test_input_contradicting_the_tied_weight_is_a_shape_mismatch_and_changes_nothing() -> None:
    emb = nn.Embedding(V, D)
    head = dnn.Linear(V, bias=False)
    head.weight = emb.weight
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"(?s)Linear layer: weight was assigned a tensor of shape \(40, 16\) before "
        r"the build.*in_features=17.*shape \(40, 17\).*left unbuilt",
    ):
        head(torch.randn(2, D + 1))
    assert isinstance(head, di.Deferred)
    assert head.weight is emb.weight
    assert head(torch.randn(2, D)).shape == (2, V)
    assert head.weight is emb.weight


def test_contradicting_tie_is_named_in_a_model_and_di_build_changes_nothing() -> None:
    emb = nn.Embedding(V, D)
    head = dnn.Linear(V, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(dnn.Linear(D + 1), head)
    with pytest.raises(di.ShapeMismatchError, match=r"Linear layer '1': weight was assigned"):
        di.build(model, (2, 3))
    assert di.pending(model) == ["0", "1"]
    assert head.weight is emb.weight


@pytest.mark.parametrize("first", ["a", "b"])
@pytest.mark.parametrize("how", ["first forward", "di.build"])
def test_two_deferred_layers_tied_before_build_are_one_parameter(first: str, how: str) -> None:
    a, b = dnn.Linear(8), dnn.Linear(8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b) if first == "a" else nn.Sequential(b, nn.Tanh(), a)
    x = torch.randn(3, 8)
    if how == "di.build":
        di.build(model, x)
    model(x)
    assert a.weight is b.weight
    assert a.weight.shape == (8, 8)
    eager_a, eager_b = nn.Linear(8, 8), nn.Linear(8, 8)
    eager_b.weight = eager_a.weight
    assert numel(model) == numel(nn.Sequential(eager_a, eager_b)) == 8 * 8 + 8 + 8


def test_reset_leaves_a_tied_embedding_weight_alone_and_rebuilds_with_it() -> None:
    model = deferred_lm()
    model(tokens())
    weight = model[0].weight
    assert isinstance(weight, nn.Parameter)
    saved = weight.detach().clone()
    di.reset(model)
    assert di.pending(model) == ["1"]
    assert model[0].weight is weight and torch.equal(weight, saved)  # not emptied
    assert model[1].weight is weight  # still the tie, so it fixes in_features again
    out = model(tokens())
    assert out.shape == (2, 5, V) and model[1].weight is weight


def test_reset_of_two_tied_deferred_layers_keeps_them_one_placeholder() -> None:
    a, b = dnn.Linear(8), dnn.Linear(8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.Tanh(), b)
    model(torch.randn(3, 8))
    weight = a.weight
    di.reset(model)
    assert isinstance(a, di.Deferred) and isinstance(b, di.Deferred)
    assert a.weight is weight and b.weight is weight
    assert isinstance(weight, nn.parameter.UninitializedParameter)
    model(torch.randn(3, 8))
    assert a.weight is b.weight is weight and weight.shape == (8, 8)
