"""A deferred layer declared inside a recorded construction is a part of the recorded
model too: ``di.materialize`` of it alone, without ``seed=``, is refused before anything
changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._record import ReplayError
from test_record_support import differing


class Holder(nn.Module):
    def __init__(self, lin: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.b = nn.Linear(4, 4)
        self.a = lin()

    def forward(self, x: torch.Tensor) -> Any:
        return self.a(self.b(x))


def test_a_twin_alone_without_seed_is_refused_and_nothing_changes() -> None:
    model: Any = di.deferred_init(Holder, lambda: dnn.Linear(3))
    di.build(model, (2, 4), device="meta")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(ReplayError, match=r"'a' \(Linear\) is part of a model recorded"):
        di.materialize(model.a)
    assert model.a.weight.device.type == "meta"
    assert model.b.weight.device.type == "meta"
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    eager = Holder(lambda: nn.Linear(4, 3))
    assert differing(eager, model) == []
