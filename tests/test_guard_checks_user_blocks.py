"""A user's block made deferrable with ``di.defer`` reports a changed inferred size
as ``ShapeMismatchError`` even where its own forward would accept the new input
(DESIGN §3.4): its layers' guard compares the sizes before each forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._become._guard import CheckingGuard


class SplitHalf(nn.Module):
    """Uses the first half of its features: any wider input also runs."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.kept = in_dim // 2
        self.proj = nn.Linear(self.kept, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x[..., : self.kept])
        return out


LazySplitHalf = di.defer(SplitHalf, in_dim=di.dim(-1))


def test_a_wider_input_to_a_slicing_block_is_a_shape_mismatch() -> None:
    net = nn.Sequential(LazySplitHalf(out_dim=4))
    net(torch.randn(2, 6))
    with pytest.raises(di.ShapeMismatchError, match=r"'0'.*in_dim=6.*di\.reset"):
        net(torch.randn(2, 10))
    assert net[0].kept == 3  # unchanged: still built for 6 features


def test_the_same_sizes_and_other_batch_sizes_still_run() -> None:
    block = LazySplitHalf(out_dim=4)
    first = block(torch.randn(2, 6))
    assert first.shape == (2, 4)
    assert block(torch.randn(5, 6)).shape == (5, 4)
    assert isinstance(block.forward, CheckingGuard)


def test_after_reset_the_new_size_is_inferred() -> None:
    net = nn.Sequential(LazySplitHalf(out_dim=4))
    net(torch.randn(2, 6))
    di.reset(net)
    assert net(torch.randn(2, 10)).shape == (2, 4)
    assert net[0].kept == 5


def test_a_twin_of_a_torch_layer_with_weights_keeps_the_plain_guard() -> None:
    layer = dnn.Linear(4)
    layer(torch.randn(2, 3))
    assert not isinstance(layer.forward, CheckingGuard)
