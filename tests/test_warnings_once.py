"""A layer whose eager construction warns warns exactly as eager does, once, at
its real construction: the meta probes at declaration and the shadow constructions
of a shape pass are quiet. Under ``-W error`` (this project's pytest setting) the
declaration works and the real construction raises eager's warning."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

ARGS: dict[str, Any] = {
    "nhead": 2,
    "norm_first": True,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
}
ARGS |= {"dim_feedforward": 8, "dropout": 0.0, "batch_first": True}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 4), torch.randn(2, 3, 4)


def _first_forward() -> None:
    dnn.Transformer(**ARGS)(*_inputs())


def _build() -> None:
    di.build(dnn.Transformer(**ARGS), *_inputs())(*_inputs())


def _build_on_meta() -> None:
    model = di.build(dnn.Transformer(**ARGS), *_inputs(), device="meta")
    di.materialize(model)(*_inputs())


def _eager() -> None:
    nn.Transformer(d_model=4, **ARGS)(*_inputs())


def _seen(run: Callable[[], None], action: str = "always") -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)  # type: ignore[arg-type]
        run()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


PATHS = [_first_forward, _build, _build_on_meta]


def test_eager_construction_warns_once() -> None:
    seen = _seen(_eager)
    assert len(seen) == 1 and "enable_nested_tensor" in seen[0]


@pytest.mark.parametrize("path", PATHS, ids=["first_forward", "build", "build_on_meta"])
def test_a_deferred_layer_warns_as_eager_does(path: Callable[[], None]) -> None:
    assert _seen(path) == _seen(_eager)


@pytest.mark.parametrize(
    "path",
    [_first_forward, _build, _build_on_meta],
    ids=["first_forward", "build", "build_on_meta"],
)
def test_under_default_filters_too(path: Callable[[], None]) -> None:
    # The registry that "default" keeps must not swallow the real construction's warning.
    assert len(_seen(path, "default")) == 1


def test_declaration_works_under_warnings_as_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = dnn.Transformer(**ARGS)
        repr(layer)
        assert not di.is_built(layer)
        with pytest.raises(UserWarning, match="enable_nested_tensor"):
            nn.Transformer(d_model=4, **ARGS)
        # The real construction raises eager's warning at the build; the layer stays
        # deferred.
        with pytest.raises((UserWarning, di.InferenceError), match="enable_nested_tensor"):
            layer(*_inputs())
        assert not di.is_built(layer)
        with pytest.raises((UserWarning, di.InferenceError), match="enable_nested_tensor"):
            di.build(layer, *_inputs())
        assert not di.is_built(layer)


def test_quiet_sections_leave_the_filters_as_they_were() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "enable_nested_tensor", UserWarning)
        before = list(warnings.filters)
        _first_forward()
        _build()
        assert warnings.filters == before
