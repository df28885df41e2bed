"""Deep copies of an unbuilt twin start out equal, as eager's copies do: eager
``nn.TransformerEncoder(layer, 3)`` constructs ``layer`` once and deep-copies it, so
its three layers hold the same initial values, drawn once. The twin's copies are
built later, each on its own; they take the values of one construction, drawn once
at the first copy's build, on every path (first forward, ``di.build``, on meta then
``di.materialize``), and the generators end where eager's do.
"""

from __future__ import annotations

import copy
import threading
import warnings
from typing import cast

import pytest
import torch
from torch import nn

import deferinit as di
from conftest import RefusingInit
from deferinit import nn as dnn

X = torch.randn(2, 5, 16)


def encoder(layer: nn.Module) -> nn.TransformerEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's nested-tensor note
        # A twin stands for an nn.TransformerEncoderLayer until its build.
        return nn.TransformerEncoder(
            cast(nn.TransformerEncoderLayer, layer), 3, enable_nested_tensor=False
        )


def linear1_weights(model: nn.Module) -> list[torch.Tensor]:
    """The stack's layers' first weights, in order."""
    return [model.get_parameter(f"0.layers.{i}.linear1.weight") for i in range(3)]


def eager() -> nn.Module:
    return nn.Sequential(
        encoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)),
        nn.Linear(16, 4),
    )


def twin() -> nn.Module:
    return nn.Sequential(
        encoder(dnn.TransformerEncoderLayer(2, 32, dropout=0.0, batch_first=True)),
        dnn.Linear(4),
    )


def build(how: str, model: nn.Module) -> nn.Module:
    if how == "first forward":
        model(X)
    elif how == "di.build":
        di.build(model, X)
    elif how == "di.build on meta, then materialize":
        di.materialize(di.build(model, X, device="meta"))
    else:
        raise AssertionError(how)
    return model


HOW = ["first forward", "di.build", "di.build on meta, then materialize"]


@pytest.mark.parametrize("how", HOW)
def test_a_stack_of_copies_of_a_twin_equals_eagers_stack(how: str) -> None:
    torch.manual_seed(0)
    reference = eager()
    after_eager = torch.rand(3)
    torch.manual_seed(0)
    built = build(how, twin())
    after = torch.rand(3)
    for key, value in reference.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    assert torch.equal(after, after_eager)  # drawn once, as eager's construction
    assert torch.equal(built(X), reference(X))


def test_copies_of_a_twin_made_by_hand_start_equal_and_then_train_apart() -> None:
    layer = dnn.Linear(3)
    a, b = copy.deepcopy(layer), copy.deepcopy(layer)
    a(torch.randn(1, 2))
    b(torch.randn(1, 2))
    assert torch.equal(a.weight, b.weight) and a.weight is not b.weight
    with torch.no_grad():
        a.weight.add_(1)
    assert not torch.equal(a.weight, b.weight)


def test_a_reset_stack_draws_anew_and_its_copies_start_equal_again() -> None:
    model = build("di.build", twin())
    first = linear1_weights(model)[0].clone()
    di.reset(model)
    di.build(model, X)
    stack = linear1_weights(model)
    assert not torch.equal(stack[0], first)
    assert torch.equal(stack[0], stack[2])


def test_seeded_copies_follow_their_names_not_each_other() -> None:
    model = di.build(twin(), X, device="meta")
    di.materialize(model, seed=0)
    stack = linear1_weights(model)
    assert not torch.equal(stack[0], stack[1])


def test_a_copy_of_a_model_holding_unbuilt_twins_is_built_on_its_own() -> None:
    # Copying the model, not the layer: another model, drawn when it is built.
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    other = copy.deepcopy(net)
    x = torch.randn(1, 3)
    torch.manual_seed(0)
    net(x)
    torch.manual_seed(1)
    other(x)
    torch.manual_seed(1)
    eager = nn.Linear(3, 4)
    assert torch.equal(other.get_parameter("0.weight"), eager.weight)
    assert not torch.equal(net.get_parameter("0.weight"), eager.weight)


def test_a_failed_build_of_copies_then_a_retry_equals_eager(refusing_init: RefusingInit) -> None:
    torch.manual_seed(0)
    reference = eager()
    torch.manual_seed(0)
    model = twin()
    model.get_submodule("1").apply(refusing_init)  # built last: the copies were before it
    with pytest.raises(RuntimeError, match="init refused"):
        di.build(model, X)
    refusing_init.stop()
    di.build(model, X)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_copies_built_by_racing_first_forwards_start_equal() -> None:
    layer = dnn.Linear(6)
    stack = nn.Sequential(*(copy.deepcopy(layer) for _ in range(4)))
    x = torch.randn(3, 6)
    barrier = threading.Barrier(4)
    outputs: list[torch.Tensor] = []

    def call() -> None:
        barrier.wait()
        outputs.append(stack(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    weights = [stack.get_parameter(f"{i}.weight") for i in range(4)]
    assert all(torch.equal(w, weights[0]) for w in weights)
    assert len(outputs) == 4 and all(torch.equal(o, outputs[0]) for o in outputs)


def _stack(deferred: bool, before: bool, after: bool) -> nn.Sequential:
    """Three copies of one layer; init queued on the layer before the copying, and on
    the second copy only after it."""
    layer = dnn.Linear(4) if deferred else nn.Linear(4, 4)
    if before:
        nn.init.normal_(layer.weight)
    stack = nn.Sequential(*[copy.deepcopy(layer) for _ in range(3)])
    if after:
        nn.init.uniform_(stack.get_parameter("1.bias"))
    return stack


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    ("before", "after"),
    [(True, False), (False, True), (True, True)],
    ids=["before", "after", "both"],
)
def test_init_queued_before_the_copying_is_shared_and_after_it_is_the_copys_own(
    how: str, before: bool, after: bool
) -> None:
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    reference = _stack(False, before, after)
    after_eager = torch.rand(3)
    torch.manual_seed(0)
    model = _stack(True, before, after)
    if how == "first forward":
        model(x)
    elif how == "di.build":
        di.build(model, x)
    else:
        di.materialize(di.build(model, x, device="meta"))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(torch.rand(3), after_eager)
