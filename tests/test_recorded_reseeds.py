"""A construction that reseeds the default generator in its ``__init__``
(``torch.manual_seed``, ``torch.set_rng_state``) replays the reseed at its place:
bitwise eager, and the generator left where eager leaves it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from test_record_support import assert_replays_as_eager, differing


class Reseeded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(123)
        self.b = nn.Linear(4, 4)


class StateSet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.random.set_rng_state(torch.Generator().manual_seed(9).get_state())
        self.b = nn.Linear(4, 4)
        torch.random.manual_seed(5)
        self.c = nn.Linear(4, 4)
        torch.set_rng_state(torch.Generator().manual_seed(9).get_state())


class SeededPerLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers = []
        for i in range(3):
            torch.manual_seed(i + 1)
            layers.append(nn.Linear(4, 4))
        self.layers = nn.Sequential(*layers)


class ReseedThenTruncated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        torch.manual_seed(7)
        self.b = nn.Linear(64, 64)
        nn.init.trunc_normal_(self.b.weight)  # simulated from the reseeded state


FACTORIES: list[Callable[[], nn.Module]] = [
    Reseeded,
    StateSet,
    SeededPerLayer,
    ReseedThenTruncated,
]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("recorded_under", "materialized_under"), [(0, 0), (3, 0), (0, 4)])
def test_a_reseed_inside_init_replays_at_its_place(
    factory: Callable[[], nn.Module], recorded_under: int, materialized_under: int
) -> None:
    assert_replays_as_eager(factory, recorded_under, materialized_under)


def test_deferred_init_itself_leaves_the_generator_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    di.deferred_init(nn.Linear, 4, 4)
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_ignores_reseeds_and_leaves_the_default_generator() -> None:
    torch.manual_seed(0)
    model: Any = di.deferred_init(Reseeded)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    di.materialize(model, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    other: Any = di.deferred_init(Reseeded)
    di.materialize(other, seed=3)
    assert differing(model, other) == []


def test_a_reseed_before_a_deferred_layer_replays_before_its_construction() -> None:
    def mixed() -> nn.Module:
        first = nn.Linear(3, 4)
        torch.manual_seed(11)
        return nn.Sequential(first, dnn.Linear(2))

    def explicit() -> nn.Module:
        first = nn.Linear(3, 4)
        torch.manual_seed(11)
        return nn.Sequential(first, nn.Linear(4, 2))

    torch.manual_seed(0)
    eager = explicit()
    torch.manual_seed(5)
    model: Any = di.build(di.deferred_init(mixed), (1, 3), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []
