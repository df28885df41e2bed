"""Every ``torch.nn`` layer whose constructor takes a size that the input determines
has a twin in ``deferinit.nn``, or a reason recorded here why not.

The test enumerates torch's own classes, so a torch release that adds such a layer
fails it until the layer gets a twin (a row in ``deferinit.nn.TWINS``) or a reason.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from deferinit import nn as dnn
from deferinit.nn import TWINS

AssertSameState = Callable[[nn.Module, nn.Module], None]

# Constructor arguments that name a size read off the input.
INPUT_SIZES = frozenset(
    {
        "in_features",
        "in1_features",
        "in2_features",
        "in_channels",
        "num_features",
        "num_channels",
        "num_parameters",
        "normalized_shape",
        "embed_dim",
        "kdim",
        "vdim",
        "d_model",
        "input_size",
    }
)

# torch.nn class name -> why it has no twin.
REASONS = {
    "RNNBase": "the base class of RNN, LSTM and GRU (its first argument is the mode); "
    "they have twins",
    "RNNCellBase": "the base class of RNNCell, LSTMCell and GRUCell, which have twins",
    "LinearCrossEntropyLoss": "new in torch 2.13 while deferinit supports torch>=2.4: its "
    "twin (in_features from input.shape[-1]) waits for twins that depend on the torch "
    "version (issue 12, item 5)",
}


def _documented_arguments(cls: type[nn.Module]) -> set[str]:
    """The names in the ``Args:`` section of torch's docstring (for classes whose
    ``__init__`` only shows ``*args, **kwargs``, as torch's RNN, LSTM and GRU)."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Args:\n(.*?)(?:^\S|\Z)", doc, re.MULTILINE | re.DOTALL)
    if section is None:
        return set()
    return set(re.findall(r"^\s{4}(\w+)(?: \([^)]*\))?:", section.group(1), re.MULTILINE))


def constructor_arguments(cls: type[nn.Module]) -> set[str]:
    params = list(inspect.signature(cls).parameters.values())
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        names |= _documented_arguments(cls)
    return names


def torch_layers() -> list[type[nn.Module]]:
    found = []
    for name in sorted(dir(nn)):
        value = getattr(nn, name)
        if not name.startswith("_") and isinstance(value, type) and issubclass(value, nn.Module):
            found.append(value)
    return found


SIZED = [cls for cls in torch_layers() if constructor_arguments(cls) & INPUT_SIZES]


def test_the_enumeration_finds_the_layers_it_must() -> None:
    names = {cls.__name__ for cls in SIZED}
    # Explicit signatures, documented-only ones (RNN), and one with a default (d_model).
    assert {"Linear", "Conv2d", "LayerNorm", "LSTM", "GRU", "Transformer"} <= names
    assert not {"ReLU", "Dropout", "Embedding", "LazyLinear", "Sequential"} & names


@pytest.mark.parametrize("cls", SIZED, ids=lambda c: c.__name__)
def test_every_layer_sized_by_its_input_has_a_twin_or_a_reason(cls: type[nn.Module]) -> None:
    sizes = sorted(constructor_arguments(cls) & INPUT_SIZES)
    if cls.__name__ in REASONS:
        assert cls not in TWINS, f"{cls.__name__} has a twin now: drop its reason"
        return
    assert cls in TWINS, (
        f"torch.nn.{cls.__name__} takes {', '.join(sizes)} (sizes the input determines) "
        f"but deferinit.nn has no twin for it: add a row to TWINS, or a reason to REASONS "
        f"in this test"
    )
    twin = getattr(dnn, cls.__name__)
    assert twin._di_cls is cls and cls.__name__ in dnn.__all__
    assert set(TWINS[cls]) <= constructor_arguments(cls)


def test_every_reason_is_still_needed() -> None:
    for name in REASONS:
        cls = getattr(nn, name, None)
        if cls is None:
            continue  # an older torch without the class
        assert constructor_arguments(cls) & INPUT_SIZES, f"{name} takes no input size"
        assert cls not in TWINS, f"{name} has a twin: drop its reason"


def test_transformer_twin_infers_d_model_from_the_last_axis_of_src() -> None:
    assert TWINS[nn.Transformer]["d_model"] == dnn.Transformer._di_rules["d_model"]
    shown = inspect.signature(dnn.Transformer).parameters
    assert "d_model" not in shown and next(iter(shown)) == "nhead"


# torch warns at construction when the encoder cannot use nested tensors; eagerly too.
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_twin_builds_the_eager_transformer_bitwise(
    batch_first: bool, assert_same_state: AssertSameState
) -> None:
    arguments: dict[str, Any] = {
        "nhead": 2,
        "num_encoder_layers": 2,
        "num_decoder_layers": 1,
        "dim_feedforward": 16,
        "dropout": 0.0,
        "batch_first": batch_first,
    }
    src, tgt = (torch.randn(3, 5, 8), torch.randn(3, 4, 8))
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    layer: nn.Module = dnn.Transformer(**arguments)
    assert list(layer.state_dict()) == list(nn.Transformer(8, **arguments).state_dict())
    torch.manual_seed(0)
    out = layer(src, tgt)
    torch.manual_seed(0)
    eager = nn.Transformer(8, **arguments)
    assert type(layer) is nn.Transformer and layer.d_model == 8
    assert_same_state(layer, eager)
    assert torch.equal(out, eager(src, tgt))
