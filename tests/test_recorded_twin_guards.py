"""A construction that declares a deferred layer and then reads a value steered by
random numbers (``nn.init.trunc_normal_``'s rejection loop): the twin's draws come
before the read in eager construction, so ``di.materialize`` records the construction
again with the twin's sizes (known after ``di.build``) and replays bitwise eager,
under the seed at deferred_init or any other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from test_record_support import differing


class Truncated(nn.Module):
    def __init__(self, lin: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.t = lin()
        self.pos = nn.Parameter(torch.empty(4, 4))
        nn.init.trunc_normal_(self.pos)

    def forward(self, x: torch.Tensor) -> Any:
        return self.t(x)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("recorded_under", [None, 11])
def test_a_twin_before_trunc_normal_replays_bitwise_eager(
    seed: int, recorded_under: int | None
) -> None:
    torch.manual_seed(seed)
    eager = Truncated(lambda: nn.Linear(4, 4))
    after_eager = torch.get_rng_state()
    torch.manual_seed(seed if recorded_under is None else recorded_under)
    model: Any = di.deferred_init(Truncated, lambda: dnn.Linear(4))
    di.build(model, (2, 4), device="meta")
    torch.manual_seed(seed)
    di.materialize(model)
    assert differing(eager, model) == []
    assert torch.equal(torch.get_rng_state(), after_eager)


class QueuedInit(nn.Module):
    def __init__(self, lin: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.t = lin()
        nn.init.normal_(self.t.weight)  # type: ignore[arg-type]  # queued on the twin's placeholder
        self.pos = nn.Parameter(torch.empty(8, 8))
        nn.init.trunc_normal_(self.pos)

    def forward(self, x: torch.Tensor) -> Any:
        return self.t(x)


@pytest.mark.parametrize("seed", range(4))
def test_a_queued_init_on_the_twin_is_drawn_before_the_read_too(seed: int) -> None:
    torch.manual_seed(seed)
    eager = QueuedInit(lambda: nn.Linear(4, 5))
    torch.manual_seed(seed)
    model: Any = di.deferred_init(QueuedInit, lambda: dnn.Linear(5))
    di.build(model, (2, 4), device="meta")
    torch.manual_seed(seed)
    di.materialize(model)
    assert differing(eager, model) == []
