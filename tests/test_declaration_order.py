"""``di.build`` and ``di.materialize`` construct twins in eager's order: the order
their constructors ran (docs/design.md §3). A layer declared before the container
that registers it (d2l's ``shared = nn.LazyLinear(8)`` used twice in a
``Sequential``) draws its values first, as the eager model with sizes written out
does, although registration order puts it later.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from conftest import RefusingInit
from deferinit import nn as dnn


def eager_shared() -> nn.Sequential:
    shared = nn.Linear(8, 8)
    return nn.Sequential(
        nn.Linear(20, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 1)
    )


def twin_shared() -> nn.Sequential:
    shared = dnn.Linear(8)
    return nn.Sequential(
        dnn.Linear(8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), dnn.Linear(1)
    )


def eager_nested() -> nn.Sequential:
    head = nn.Linear(6, 3)
    body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    stem = nn.Linear(5, 6)
    return nn.Sequential(body, stem, head)


def twin_nested() -> nn.Sequential:
    head = dnn.Linear(3)
    body = nn.Sequential(dnn.Linear(5), nn.Tanh())
    stem = dnn.Linear(6)
    return nn.Sequential(body, stem, head)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], int]] = {
    "d2l shared layer": (eager_shared, twin_shared, 20),
    "nested, declared out of order": (eager_nested, twin_nested, 4),
}


def build(how: str, model: nn.Module, features: int) -> nn.Module:
    if how == "di.build":
        return di.build(model, (2, features))
    if how == "di.build on meta, then materialize":
        return di.materialize(di.build(model, (2, features), device="meta"))
    if how == "di.build from a config":
        config = di.build_config(di.build(model, (2, features), device="meta"))
        return di.build(model, config=config)
    raise AssertionError(how)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    "how", ["di.build", "di.build on meta, then materialize", "di.build from a config"]
)
def test_layers_declared_before_their_container_get_eagers_values(model: str, how: str) -> None:
    eager, twin, features = MODELS[model]
    torch.manual_seed(0)
    reference = eager()
    torch.manual_seed(0)
    if how == "di.build from a config":
        config = di.build_config(di.build(twin(), (2, features), device="meta"))
        torch.manual_seed(0)
        built = di.build(twin(), config=config)
    else:
        built = build(how, twin(), features)
    assert list(built.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    x = torch.randn(2, features)
    assert torch.equal(built(x), reference(x))


def test_shared_layer_stays_one_module_after_a_reordered_build() -> None:
    net = di.build(twin_shared(), (2, 20))
    assert net[2] is net[4]
    assert net[2].weight is net[4].weight
    assert len(list(net.parameters())) == 6


def test_a_failed_reordered_build_leaves_every_layer_deferred_and_a_retry_equals_eager(
    refusing_init: RefusingInit,
) -> None:
    torch.manual_seed(0)
    net = twin_shared()
    net[6].apply(refusing_init)  # built last: the shared layer and net[0] were built before it
    with pytest.raises(RuntimeError, match="init refused"):
        di.build(net, (2, 20))
    assert all(isinstance(m, di.Deferred) for m in (net[0], net[2], net[6]))
    refusing_init.stop()
    di.build(net, (2, 20))
    torch.manual_seed(0)
    reference = eager_shared()
    for key, value in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_adopted_lazy_modules_are_constructed_where_registration_puts_them() -> None:
    def twins_and_lazy() -> nn.Sequential:
        shared = dnn.Linear(8)
        return nn.Sequential(dnn.Linear(8), nn.ReLU(), shared, nn.LazyLinear(4), nn.LazyLinear(2))

    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    reference = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), shared, nn.Linear(8, 4), nn.Linear(4, 2))
    torch.manual_seed(0)
    built = di.build(di.adopt(twins_and_lazy()), (2, 20))
    for key, value in reference.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
