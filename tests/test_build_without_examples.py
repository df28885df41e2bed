"""``di.build(model)`` without examples or ``config=`` (DESIGN §3.5, §3.10).

With nothing deferred it has nothing to do: the model comes back unchanged and
its forward does not run. With deferred layers it cannot know their sizes: a
``NotBuiltError`` lists them and says to pass examples or ``config=``, and the
model is left as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class _Refuses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the forward must not run")


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(dnn.Linear(3, in_features=5), _Refuses()),
        lambda: nn.Sequential(nn.Linear(5, 3), _Refuses()),
        lambda: di.build(nn.Sequential(dnn.Linear(3)), (2, 5)),
    ],
    ids=["explicit-size twin", "plain torch", "already built"],
)
def test_nothing_deferred_is_a_no_op(make: object) -> None:
    model = make()  # type: ignore[operator]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert di.build(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_deferred_layers_without_examples_are_named() -> None:
    model = nn.Sequential(dnn.Linear(8), nn.ReLU(), nn.Linear(8, 8), dnn.LayerNorm())
    with pytest.raises(di.NotBuiltError) as caught:
        di.build(model)
    message = str(caught.value)
    assert "'0'" in message and "'3'" in message and "'2'" not in message
    assert "example" in message and "config=" in message
    assert di.pending(model) == ["0", "3"]
    model(torch.randn(2, 5))  # still builds by its first forward
    assert model[0].in_features == 5


def test_device_alone_is_not_an_example() -> None:
    model = nn.Sequential(dnn.Linear(3))
    with pytest.raises(di.NotBuiltError, match="'0'"):
        di.build(model, device="meta")
    assert di.pending(model) == ["0"]
