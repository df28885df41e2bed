"""Arguments a deferred layer's torch class rejects whatever sizes are inferred
raise ``di.ArgumentsError``: a ``DeferredInitError`` (DESIGN §3.10: every error
from deferinit's own code is one) that is also the ``TypeError`` Python code
expects for wrong constructor arguments; the layer is left unbuilt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


@pytest.mark.parametrize(
    "declare",
    [
        lambda: dnn.LSTM(hidden_size=4, proj_size=4),
        lambda: dnn.MultiheadAttention(num_heads=0),
    ],
    ids=["LSTM proj_size=hidden_size", "MultiheadAttention num_heads=0"],
)
def test_rejected_arguments_at_the_declaration_are_an_arguments_error(declare: object) -> None:
    with pytest.raises(di.ArgumentsError, match="rejects these arguments.*Fix") as caught:
        declare()  # type: ignore[operator]
    assert isinstance(caught.value, di.DeferredInitError) and isinstance(caught.value, TypeError)


def test_rejected_arguments_known_only_at_the_first_call_are_one_too() -> None:
    net = nn.Sequential(dnn.Conv2d(6, 5, padding="bogus"))
    with pytest.raises(di.ArgumentsError, match=r"Conv2d rejects these arguments.*bogus"):
        net(torch.randn(1, 3, 8, 8))
    assert di.pending(net) == ["0"]


def test_a_model_with_rejected_arguments_still_shows_and_summarizes() -> None:
    # print(model), a debugger or a log must not crash on a model whose declaration
    # succeeded: only its build says the arguments are wrong.
    net = nn.Sequential(dnn.Conv2d(6, 5, padding="bogus"), dnn.Linear(3))
    assert "Conv2d(in_channels=?, out_channels=6, kernel_size=5, padding='bogus')" in repr(net)
    rows = di.summary(net).to_dict()["rows"]
    assert [row["state"] for row in rows] == ["deferred", "deferred"]
    with pytest.raises(di.ArgumentsError, match="bogus"):
        di.summary(net, torch.randn(1, 3, 8, 8))
    assert di.pending(net) == ["0", "1"]
