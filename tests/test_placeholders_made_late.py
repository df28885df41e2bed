"""A flat twin makes its placeholders when first looked at, not at its declaration
(the first forward of most layers comes before anyone looks). Whatever looks, and
whenever, must see what an eager declaration would have made."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

import deferinit as di
from deferinit import nn as dnn
from deferinit._declare._deferred import placeholders_made

DeclaredIn = Callable[[torch.dtype, Callable[[], nn.Module]], nn.Module]


def test_a_declared_twin_makes_no_placeholder_until_looked_at() -> None:
    layer = dnn.Linear(3)
    assert not placeholders_made(layer)
    assert isinstance(layer.weight, UninitializedParameter)
    assert placeholders_made(layer)


def test_the_first_forward_of_an_unseen_twin_equals_eager() -> None:
    x = torch.randn(4, 3)
    torch.manual_seed(0)
    built = nn.Sequential(dnn.Linear(5), nn.ReLU(), dnn.Linear(2))
    out = built(x)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    assert torch.equal(out, eager(x))
    for a, b in zip(built.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)


def test_placeholders_looked_at_later_keep_the_declarations_device() -> None:
    with torch.device("meta"):
        layer = dnn.Linear(3)
    assert layer.weight.device.type == "meta"
    cpu = dnn.Linear(3)
    with torch.device("meta"):
        assert cpu.weight.device.type == "cpu"


def test_placeholders_looked_at_later_keep_the_declarations_dtype(
    declared_in: DeclaredIn,
) -> None:
    layer = declared_in(torch.float64, lambda: dnn.Linear(3))
    assert layer.weight.dtype == torch.float64
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_an_optimizer_made_before_the_build_holds_the_built_parameters() -> None:
    model = nn.Sequential(dnn.Linear(4), dnn.Linear(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 5))
    held = optimizer.param_groups[0]["params"]
    assert [p is q for p, q in zip(held, model.parameters(), strict=True)] == [True] * 4
    assert all(not isinstance(p, UninitializedParameter) for p in held)


def test_a_tie_assigned_before_anything_looked_is_kept() -> None:
    embedding = nn.Embedding(10, 4)
    head = dnn.Linear(10, bias=False)
    head.weight = embedding.weight
    head(torch.randn(2, 4))
    assert head.weight is embedding.weight


def test_a_tie_that_does_not_fit_is_refused_and_the_twin_stays_unbuilt() -> None:
    head = dnn.Linear(10, bias=False)
    head.weight = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(di.ShapeMismatchError, match="weight"):
        head(torch.randn(2, 4))
    assert isinstance(head, di.Deferred)


def test_tensors_registered_on_a_twin_before_its_build_are_kept_after_it() -> None:
    layer = dnn.Linear(2)
    extra = nn.Parameter(torch.zeros(1))
    layer.register_buffer("scale", torch.ones(1))
    layer.register_buffer("cache", torch.zeros(2), persistent=False)
    layer.register_parameter("extra", extra)
    layer(torch.randn(1, 3))
    assert type(layer) is nn.Linear  # type: ignore[comparison-overlap]  # it became one
    assert torch.equal(layer.scale, torch.ones(1))
    assert layer.extra is extra
    assert list(dict(layer.named_parameters())) == ["weight", "bias", "extra"]
    assert list(layer.state_dict()) == ["weight", "bias", "extra", "scale"]


def test_a_tensor_registered_under_a_name_the_build_sets_is_refused_unbuilt() -> None:
    layer = dnn.Linear(2)
    layer.register_buffer("in_features", torch.ones(1))
    with pytest.raises(di.DeferredInitError, match="in_features"):
        layer(torch.randn(1, 3))
    assert isinstance(layer, di.Deferred)
    assert torch.equal(layer.in_features, torch.ones(1))


def test_assigning_a_non_tensor_to_a_placeholder_name_is_refused_as_eager() -> None:
    layer = dnn.Linear(2)
    with pytest.raises(TypeError, match="weight"):
        layer.weight = 3  # type: ignore[assignment]


def test_eval_before_the_build_carries_over_and_makes_no_placeholder() -> None:
    model = nn.Sequential(dnn.Linear(2), dnn.BatchNorm1d())
    model.eval()
    assert not placeholders_made(model[0])
    model(torch.randn(3, 4))
    assert not model[1].training
    assert torch.equal(model[1].get_buffer("running_mean"), torch.zeros(2))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_of_an_unseen_twin_builds_like_the_original(how: str) -> None:
    layer = dnn.Linear(3)
    twin = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    torch.manual_seed(1)
    twin(torch.randn(2, 4))
    torch.manual_seed(1)
    layer(torch.randn(2, 4))
    assert torch.equal(twin.weight, layer.weight)


def test_a_state_dict_of_an_unseen_twin_names_its_placeholders() -> None:
    state = dnn.BatchNorm2d().state_dict()
    assert list(state) == list(nn.BatchNorm2d(3).state_dict())


def test_threads_looking_at_once_see_the_same_placeholders() -> None:
    for _ in range(20):
        layer = dnn.Linear(3)
        seen: list[list[int]] = []
        start = threading.Barrier(4)

        def look(
            layer: nn.Module = layer,
            start: threading.Barrier = start,
            seen: list[list[int]] = seen,
        ) -> None:
            start.wait()
            seen.append([id(p) for p in layer.parameters()])

        threads = [threading.Thread(target=look) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s == seen[0] for s in seen)
        assert seen[0] == [id(p) for p in layer.parameters()]


def test_a_build_on_meta_of_unseen_twins_then_materialize_equals_eager() -> None:
    torch.manual_seed(3)
    model = di.build(nn.Sequential(dnn.Linear(5), dnn.Linear(2)), (1, 3), device="meta")
    assert model[0].weight.is_meta
    di.materialize(model)
    torch.manual_seed(3)
    eager = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_twin_first_looked_at_inside_a_recording_is_not_recorded() -> None:
    layer = dnn.Linear(2)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer
            self.count = len(list(layer.parameters()))
            self.head = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.inner(x))
            return out

    model = di.deferred_init(Model)
    assert model.count == 2
    di.build(model, (1, 3), device="meta")
    di.materialize(model)
    assert model.inner.weight.shape == (2, 3) and not model.inner.weight.is_meta
    assert not model.head.weight.is_meta
