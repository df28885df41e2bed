"""``di.defer`` on a class whose constructor forwards ``*args, **kwargs`` to its base
(docs/design.md §2: any ``nn.Module`` class): its arguments are its own named ones
plus those of the class it forwards to, up the MRO while each forwards."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di


class Head(nn.Linear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


class ScaledHead(Head):
    """Forwards to a class that forwards in turn."""

    def __init__(self, scale: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class KeywordHead(nn.Linear):
    """Forwards keywords only: Linear's arguments can only be given by keyword."""

    def __init__(self, *, tag: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tag = tag


class Stack(nn.Module):
    """Takes its layers positionally; nothing to forward them to."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


def assert_same(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key


def test_a_forwarding_constructor_takes_its_bases_arguments() -> None:
    lazy = di.defer(Head, in_features=di.dim(-1))
    assert list(inspect.signature(lazy).parameters) == ["out_features", "bias", "device", "dtype"]
    x = torch.randn(3, 20)
    torch.manual_seed(0)
    layer = lazy(64)  # out_features, as dnn.Linear(64)
    out = layer(x)
    torch.manual_seed(0)
    eager = Head(20, 64)
    assert type(layer) is Head  # type: ignore[comparison-overlap]
    assert_same(layer, eager)
    assert torch.equal(out, eager(x))


def test_the_chain_is_followed_while_it_forwards() -> None:
    lazy = di.defer(ScaledHead, in_features=di.dim(-1))
    assert list(inspect.signature(lazy).parameters)[:3] == ["scale", "out_features", "bias"]
    x = torch.randn(3, 5)
    torch.manual_seed(0)
    layer = lazy(0.5, 4, bias=False)
    out = layer(x)
    torch.manual_seed(0)
    eager = ScaledHead(0.5, 5, 4, bias=False)
    assert_same(layer, eager)
    assert torch.equal(out, eager(x))
    assert layer.scale == 0.5


def test_arguments_forwarded_as_keywords_stay_keyword_only() -> None:
    lazy = di.defer(KeywordHead, in_features=di.dim(-1))
    params = inspect.signature(lazy).parameters
    assert params["out_features"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        lazy(4)  # eager KeywordHead(5, 4) is refused too
    x = torch.randn(2, 5)
    torch.manual_seed(0)
    layer = lazy(out_features=4, tag="t")
    layer(x)
    torch.manual_seed(0)
    assert_same(layer, KeywordHead(in_features=5, out_features=4, tag="t"))


def test_a_class_forwarding_to_nothing_keeps_its_own_arguments() -> None:
    with pytest.raises(TypeError, match="'width' not a constructor argument"):
        di.defer(Stack, width=di.dim(-1))


class MyLSTM(nn.LSTM):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def test_a_chain_through_a_torch_forwarder_is_not_guessed() -> None:
    # nn.LSTM passes its arguments on to RNNBase reworked (a mode first): binding
    # by RNNBase's signature would put a size into mode.
    with pytest.raises(TypeError, match="'input_size' not a constructor argument"):
        di.defer(MyLSTM, input_size=di.dim(-1))


def test_a_constructor_named_argument_still_wins() -> None:
    lazy = di.defer(ScaledHead, scale=lambda x: float(x.shape[-1]), in_features=di.dim(-1))
    layer = lazy(2)
    layer(torch.ones(1, 3))
    assert layer.scale == 3.0
    assert layer.weight.shape == (2, 3)
