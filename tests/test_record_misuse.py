"""Misusing a recorded model gets deferinit's errors with the fix, not torch's from inside:
a forward on data before ``di.materialize``, ``di.build`` off meta, and a shape-only
build of a forward that reads values."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def mixed() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), dnn.Linear(2))


def test_a_forward_on_data_before_materialize_names_the_fix() -> None:
    model = di.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(di.NotBuiltError, match=r"recorded by di.deferred_init.*di.materialize"):
        model(torch.randn(2, 3))
    torch.manual_seed(0)
    di.materialize(model)
    assert model(torch.randn(2, 3)).shape == (2, 4)  # and runs once materialized


def test_a_recorded_model_whose_values_were_all_loaded_runs() -> None:
    model: Any = di.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4)))
    di.load_state_dict(model, {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)})
    assert torch.equal(model(torch.ones(1, 3)), torch.full((1, 4), 3.0))


def test_di_build_of_a_recorded_model_off_meta_is_refused_unchanged() -> None:
    model: Any = di.deferred_init(mixed)
    refused = r"built on meta.*Nothing was built.*device='meta'"
    with pytest.raises(di.DeferredInitError, match=refused):
        di.build(model, torch.randn(2, 3))
    assert isinstance(model[1], di.Deferred)
    di.build(model, torch.randn(2, 3), device="meta")  # the right call works
    assert not isinstance(model[1], di.Deferred)


class ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = dnn.Linear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x if x.sum() > 0 else -x)
        return out


def test_a_shape_only_build_of_a_forward_that_reads_values_names_the_fix() -> None:
    model = ReadsValues()
    with pytest.raises(di.InferenceError, match=r"reads tensor values.*model\(example\)"):
        di.build(model, torch.randn(2, 3))
    assert isinstance(model.fc, di.Deferred)
    model(torch.randn(2, 3))  # the fix works
    assert not isinstance(model.fc, di.Deferred)
