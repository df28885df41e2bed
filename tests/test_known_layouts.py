"""Layouts known without constructing anything (docs/design.md §5: a first call in a
fresh interpreter must not pay for a meta construction per class).

For the torch layers in ``_layout.KNOWN`` a placeholder's parameter and buffer names,
dtypes and ``requires_grad`` flags follow from its arguments; each row is held here
against the class itself constructed on meta, for every combination of the flags
that decide which tensors exist, and for a non-default dtype.
"""

from __future__ import annotations

import itertools
import pickle
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._declare import _layout
from deferinit._declare._deferred import Deferred

# The arguments each known class needs besides its inferred sizes.
REQUIRED: dict[type[nn.Module], dict[str, Any]] = {
    nn.Linear: {"out_features": 3},
    nn.Bilinear: {"out_features": 3},
    nn.Conv1d: {"out_channels": 3, "kernel_size": 2},
    nn.Conv2d: {"out_channels": 3, "kernel_size": 2},
    nn.Conv3d: {"out_channels": 3, "kernel_size": 2},
    nn.ConvTranspose1d: {"out_channels": 3, "kernel_size": 2},
    nn.ConvTranspose2d: {"out_channels": 3, "kernel_size": 2},
    nn.ConvTranspose3d: {"out_channels": 3, "kernel_size": 2},
    nn.GroupNorm: {"num_groups": 1},
    nn.PReLU: {"per_channel": True},  # else its size is known: it builds at once
}


def _twin(cls: type[nn.Module]) -> type[Deferred]:
    twin: type[Deferred] = getattr(dnn, cls.__name__)
    assert twin._di_cls is cls
    return twin


def _declarations() -> list[tuple[type[nn.Module], dict[str, Any]]]:
    cases = []
    for cls, rows in _layout.KNOWN.items():
        flags = sorted({f for _, _, needs, _ in rows for f in needs})
        taken = [f for f in flags if f in _twin(cls)._di_init_signature.parameters]
        for values in itertools.product((True, False), repeat=len(taken)):
            cases.append((cls, {**REQUIRED.get(cls, {}), **dict(zip(taken, values, strict=True))}))
        cases.append((cls, {**REQUIRED.get(cls, {}), "dtype": torch.float64}))
    return cases


DECLARATIONS = _declarations()


@pytest.mark.parametrize(
    ("cls", "arguments"), DECLARATIONS, ids=[f"{c.__name__}-{a}" for c, a in DECLARATIONS]
)
def test_a_known_layout_equals_the_layout_of_the_class_constructed_on_meta(
    cls: type[nn.Module], arguments: dict[str, Any]
) -> None:
    layer = _twin(cls)(**arguments)
    known = layer._di.layout
    assert known is not None
    probed = _layout._probe_declared(type(layer), layer._di)
    assert known.tensors == probed.tensors
    assert known.modules == probed.modules == ()


def test_declaring_a_known_layer_constructs_nothing_until_it_is_printed() -> None:
    refuse = mock.patch.object(nn.Conv2d, "__init__", side_effect=AssertionError("constructed"))
    with refuse:
        layer = dnn.Conv2d(4, 3, padding=5)  # arguments no other test declares
        assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert repr(layer) == "Conv2d(?, 4, kernel_size=(3, 3), stride=(1, 1), padding=(5, 5))"


def test_a_known_layout_pickles_with_what_its_meta_construction_shows() -> None:
    layer = dnn.Linear(5, bias=False)
    copy = pickle.loads(pickle.dumps(layer))
    assert repr(copy) == repr(layer) == "Linear(in_features=?, out_features=5, bias=False)"
    assert list(copy.state_dict()) == ["weight"]


def test_arguments_a_known_layer_rejects_whatever_its_sizes_are_named_at_the_first_call() -> None:
    layer = dnn.Conv2d(6, 5, padding="bogus")  # known without constructing: not checked yet
    with pytest.raises(TypeError, match=r"torch\.nn\.Conv2d rejects these arguments.*bogus"):
        layer(torch.randn(1, 3, 8, 8))
    assert not di.is_built(layer)
