"""``di.build`` lists every deferred layer its examples did not reach (DESIGN §3.8),
those that a deferred block declares in its own ``__init__`` included, and builds
nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class Block(nn.Module):
    """Declares a deferred head its forward never calls."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 4)
        self.unused_head = dnn.Linear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


LazyBlock = di.defer(Block, in_dim=di.dim(-1))


def test_a_twin_a_deferred_block_declares_and_never_calls_is_listed() -> None:
    net = nn.Sequential(LazyBlock(), dnn.Linear(2))
    with pytest.raises(
        di.NotBuiltError, match=r"did not reach the deferred layer\(s\) '0\.unused_head'"
    ):
        di.build(net, torch.randn(2, 3))
    assert di.pending(net) == ["0", "1"]  # nothing built


def test_with_an_unreached_top_level_layer_both_are_listed() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = LazyBlock()
            self.aux = dnn.Linear(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.body(x)
            return out

    with pytest.raises(
        di.NotBuiltError, match=r"'aux'.*'body\.unused_head'|'body\.unused_head'.*'aux'"
    ):
        di.build(Heads(), torch.randn(2, 3))


def test_a_block_whose_twins_are_all_reached_builds() -> None:
    class Used(nn.Module):
        def __init__(self, in_dim: int) -> None:
            super().__init__()
            self.head = dnn.Linear(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(x)
            return out

    net = di.build(nn.Sequential(di.defer(Used, in_dim=di.dim(-1))()), torch.randn(2, 6))
    assert di.is_built(net)
