"""Wrong arguments to deferinit's functions raise ``di.ArgumentsError``: a
``DeferredInitError`` (docs/errors.md: every error from deferinit's own code is one)
that is also the ``TypeError`` and ``ValueError`` Python code checks for, says the fix,
and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _meta_built() -> nn.Sequential:
    return di.build(nn.Sequential(dnn.Linear(4)), (2, 3), device="meta")


CALLS: dict[str, Callable[[nn.Module], Any]] = {
    "materialize on meta": lambda m: di.materialize(m, device="meta"),
    "materialize integer dtype": lambda m: di.materialize(m, dtype=torch.long),
    "materialize dtype as a string": lambda m: di.materialize(m, dtype="float32"),  # type: ignore[arg-type, type-var]
    "materialize string seed": lambda m: di.materialize(m, seed="x"),  # type: ignore[arg-type, type-var]
    "materialize unknown device": lambda m: di.materialize(m, device="nope"),
    "build unknown device": lambda m: di.build(m, (2, 3), device="nope"),
}


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_a_wrong_argument_is_an_arguments_error_and_changes_nothing(
    call: Callable[[nn.Module], Any],
) -> None:
    model = _meta_built()
    with pytest.raises(di.ArgumentsError, match="Fix") as caught:
        call(model)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert isinstance(caught.value, di.DeferredInitError)
    assert model[0].weight.is_meta
    di.materialize(model)
    assert not model[0].weight.is_meta


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("function", ["build", "materialize"])
def test_cuda_without_cuda_says_so(function: str) -> None:
    model = _meta_built()
    with pytest.raises(di.ArgumentsError, match=r"no CUDA device.*Fix"):
        if function == "build":
            di.build(nn.Sequential(dnn.Linear(4)), (2, 3), device="cuda")
        else:
            di.materialize(model, device="cuda")


@pytest.mark.parametrize(
    "call",
    [
        lambda: di.build(42, (2, 3)),  # type: ignore[arg-type, type-var]
        lambda: di.materialize("model"),  # type: ignore[arg-type, type-var]
        lambda: di.initialize(None),  # type: ignore[arg-type, type-var]
        lambda: di.initialize(nn.Linear(2, 2), 3),  # type: ignore[arg-type, type-var]
        lambda: di.reset([]),  # type: ignore[type-var]
        lambda: di.adopt(object()),  # type: ignore[arg-type, type-var]
        lambda: di.summary(1),  # type: ignore[arg-type, type-var]
        lambda: di.build_config("x"),  # type: ignore[arg-type, type-var]
        lambda: di.load_state_dict({}, nn.Linear(2, 2)),  # type: ignore[arg-type, type-var]
        lambda: di.defer(int, x=di.dim(-1)),  # type: ignore[arg-type, type-var]
        lambda: di.defer(nn.Linear),
        lambda: di.defer(nn.Linear, nope=di.dim(-1)),
        lambda: di.defer(dnn.Linear, in_features=di.dim(-1)),
        lambda: dnn.Linear(4, bogus=1),
        lambda: dnn.Conv(4, 3, spatial_dims=4),
    ],
)
def test_misuse_of_the_public_functions_is_an_arguments_error(call: Callable[[], Any]) -> None:
    with pytest.raises(di.ArgumentsError) as caught:
        call()
    assert isinstance(caught.value, TypeError)
