"""A deferred class cannot be subclassed (docs/design.md §3.2): its layer becomes
exactly the torch class at its build, so a subclass's overrides would work only until
then. The refusal comes at class creation and names the fix: subclass the torch
class and make that deferrable with ``di.defer``."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def test_subclassing_a_twin_is_refused_with_the_fix() -> None:
    with pytest.raises(
        TypeError,
        match=r"(?s)MyLin.*torch\.nn\.Linear.*di\.defer\(MyLin, in_features=di\.dim\(-1\)\)",
    ):

        class MyLin(dnn.Linear):  # type: ignore[valid-type, misc]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x) * 0  # type: ignore[no-any-return]


def test_any_twin_is_refused() -> None:
    with pytest.raises(TypeError, match="MyNorm cannot subclass the deferred LayerNorm"):

        class MyNorm(dnn.LayerNorm):  # type: ignore[valid-type, misc]
            pass


class Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # type: ignore[no-any-return]


def test_subclassing_a_defer_class_is_refused() -> None:
    lazy_block = di.defer(Block, in_dim=di.dim(-1))
    with pytest.raises(
        TypeError, match=r"(?s)MyBlock.*Block.*di\.defer\(MyBlock, in_dim=di\.dim\(-1\)\)"
    ):

        class MyBlock(lazy_block):  # type: ignore[valid-type, misc]
            pass


def test_subclassing_deferred_itself_is_refused() -> None:
    with pytest.raises(TypeError, match="Own.*cannot be subclassed"):

        class Own(di.Deferred):
            pass


def test_the_fix_keeps_the_overrides_after_the_build() -> None:
    class MyLin(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0

    layer = di.defer(MyLin, in_features=di.dim(-1))(4)
    x = torch.ones(2, 3)
    assert layer(x).abs().sum() == 0
    assert layer(x).abs().sum() == 0
    assert type(layer) is MyLin  # type: ignore[comparison-overlap]


def test_deferred_classes_are_still_made_and_pickled() -> None:
    lazy_block = di.defer(Block, in_dim=di.dim(-1))
    assert lazy_block(out_dim=2)(torch.ones(1, 3)).shape == (1, 2)
    layer = pickle.loads(pickle.dumps(dnn.Linear(2)))
    assert isinstance(layer, dnn.Linear)
    assert dnn.Conv(4, 3)(torch.ones(1, 2, 5, 5)).shape == (1, 4, 3, 3)
