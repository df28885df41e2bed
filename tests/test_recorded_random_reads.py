"""A value read steered by random numbers (``trunc_normal_``'s rejection loop) gives
eager's values whatever the generator state at ``di.deferred_init``: the state at
``di.materialize`` is what eager construction starts from."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit._record import ReplayError, ValueReadError
from test_record_support import differing


def truncated() -> nn.Module:
    layer = nn.Linear(64, 64)
    nn.init.trunc_normal_(layer.weight)  # torch's defaults: a rejection loop
    return layer


def test_trunc_normal_is_eager_whatever_the_state_at_deferred_init() -> None:
    torch.manual_seed(0)
    eager = truncated()
    after_eager = torch.get_rng_state()
    for seed in range(10):
        torch.manual_seed(100 + seed)
        model = di.deferred_init(truncated)
        torch.manual_seed(0)
        di.materialize(model)
        assert differing(eager, model) == []
        assert torch.equal(torch.get_rng_state(), after_eager)  # eager's draws, no more


def test_a_deep_copy_replays_under_the_state_at_materialize_too() -> None:
    torch.manual_seed(0)
    eager = truncated()
    found = 0
    for seed in range(10):
        torch.manual_seed(100 + seed)
        model = copy.deepcopy(di.deferred_init(truncated))
        torch.manual_seed(0)
        di.materialize(model)
        assert differing(eager, model) == []
        found += 1
    assert found == 10


class Counted(nn.Module):
    """Keeps how many rejection rounds a random read took: eager's Python state."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))
        self.positive = int((self.w > 0).sum())


def _seeds_with_other_counts() -> tuple[int, int]:
    counts: dict[int, int] = {}
    for seed in range(50):
        torch.manual_seed(seed)
        counts.setdefault(int((torch.randn(8) > 0).sum()), seed)
    first, second = list(counts.values())[:2]
    return first, second


def test_a_python_value_that_eager_would_set_otherwise_is_refused() -> None:
    recorded_under, materialized_under = _seeds_with_other_counts()
    torch.manual_seed(recorded_under)
    model: Any = di.deferred_init(Counted)
    torch.manual_seed(materialized_under)
    state = torch.get_rng_state()
    with pytest.raises(
        ReplayError,
        match=r"steered by random numbers .*Counted\.__init__.*while recording it was "
        r"\d+.*it is \d+.*'positive'.*left on meta.*Fix: set the seed before deferred_init",
    ):
        di.materialize(model)
    assert model.w.is_meta and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(recorded_under)
    eager = Counted()
    torch.manual_seed(recorded_under)
    di.materialize(model)
    assert differing(eager, model) == [] and model.positive == eager.positive


class _DrawsByValue(nn.Module):
    """A draw whose count of random numbers depends on its input's values, then a
    read steered by random numbers (trunc_normal_'s rejection loop)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "multinomial":
            self.register_buffer("idx", torch.multinomial(torch.ones(10), 3))
        else:
            self.register_buffer("x", torch.poisson(torch.full((30,), 3.0)))
        self.w = nn.Parameter(nn.init.trunc_normal_(torch.empty(8), std=1.0))


@pytest.mark.parametrize("kind", ["multinomial", "poisson"])
def test_a_read_after_a_draw_counted_by_values_is_refused_at_the_recording(kind: str) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(ValueReadError, match=rf"earlier draw \(aten\.{kind}.*Fix"):
        di.deferred_init(_DrawsByValue, kind)
    assert torch.equal(torch.get_rng_state(), before)
