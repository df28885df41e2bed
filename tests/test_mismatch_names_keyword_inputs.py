"""A size read off a keyword argument is reported with that argument: the
``ShapeMismatchError`` shows every input by name, at the build and now (DESIGN
§3.4: the size it was built for, the input shape it got)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class TwoInputs(nn.Module):
    def __init__(self, d: int, e: int, out: int) -> None:
        super().__init__()
        self.d, self.e = d, e
        self.proj = nn.Linear(d + e, out)

    def forward(self, x: torch.Tensor, *, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(torch.cat([x[..., : self.d], y[..., : self.e]], -1))
        return out


LazyTwoInputs = di.defer(TwoInputs, d=di.dim(-1), e=di.dim(-1, arg="y"))


def test_a_changed_keyword_input_is_named_at_the_build_and_now() -> None:
    block = LazyTwoInputs(out=3)
    block(torch.rand(2, 4), y=torch.rand(2, 5))
    with pytest.raises(di.ShapeMismatchError) as caught:
        block(torch.rand(2, 4), y=torch.rand(2, 7))
    message = str(caught.value)
    assert "e=5" in message and "e=7" in message
    assert "y=a float32 tensor of shape (2, 5)" in message  # what it was built from
    assert "y=a float32 tensor of shape (2, 7)" in message  # what it got now


def test_a_single_positional_input_reads_as_before() -> None:
    layer = dnn.Linear(4)
    layer(torch.rand(2, 3))
    with pytest.raises(
        di.ShapeMismatchError, match=r"inferred from a float32 tensor of shape \(2, 3\)\)"
    ):
        layer(torch.rand(2, 5))
