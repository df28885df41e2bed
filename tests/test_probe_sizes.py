"""Head counts that no fixed stand-in size divides still declare (the meta probe
also tries 1009 times the lcm of the explicit integer arguments), and the built
layers equal eager ones bitwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

HEADS = (11, 13, 25, 256)

# (twin, eager class, d_model keyword, extra arguments, number of forward inputs)
CASES: list[tuple[str, Callable[..., nn.Module], type[nn.Module], str, dict[str, Any], int]] = [
    ("MultiheadAttention", dnn.MultiheadAttention, nn.MultiheadAttention, "embed_dim", {}, 3),
    (
        "TransformerEncoderLayer",
        dnn.TransformerEncoderLayer,
        nn.TransformerEncoderLayer,
        "d_model",
        {"dim_feedforward": 8, "dropout": 0.0},
        1,
    ),
    (
        "TransformerDecoderLayer",
        dnn.TransformerDecoderLayer,
        nn.TransformerDecoderLayer,
        "d_model",
        {"dim_feedforward": 8, "dropout": 0.0},
        2,
    ),
    (
        "Transformer",
        dnn.Transformer,
        nn.Transformer,
        "d_model",
        {
            "num_encoder_layers": 1,
            "num_decoder_layers": 1,
            "dim_feedforward": 8,
            "dropout": 0.0,
            "batch_first": True,
        },
        2,
    ),
]
IDS = [c[0] for c in CASES]


def _heads_keyword(eager: type[nn.Module]) -> str:
    return "num_heads" if eager is nn.MultiheadAttention else "nhead"


def _inputs(heads: int, count: int) -> tuple[torch.Tensor, ...]:
    d = 2 * heads
    return tuple(torch.randn(2, 3, d) for _ in range(count))


def _same_state(built: nn.Module, eager: nn.Module) -> None:
    ours, theirs = built.state_dict(), eager.state_dict()
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        assert ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), name


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize(("name", "twin", "eager", "dim", "extra", "count"), CASES, ids=IDS)
def test_head_count_no_stand_in_divides_declares(
    name: str,
    twin: Callable[..., nn.Module],
    eager: type[nn.Module],
    dim: str,
    extra: dict[str, Any],
    count: int,
    heads: int,
) -> None:
    layer = twin(**{_heads_keyword(eager): heads}, **extra)
    assert not di.is_built(layer)
    assert "?" in repr(layer)


# torch's own warning, at eager's construction too, for an odd head count.
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize(("name", "twin", "eager", "dim", "extra", "count"), CASES, ids=IDS)
def test_head_count_no_stand_in_divides_builds_as_eager(
    name: str,
    twin: Callable[..., nn.Module],
    eager: type[nn.Module],
    dim: str,
    extra: dict[str, Any],
    count: int,
    heads: int,
) -> None:
    inputs = _inputs(heads, count)
    arguments = {_heads_keyword(eager): heads, **extra}
    if eager is nn.MultiheadAttention:
        arguments["batch_first"] = True

    torch.manual_seed(0)
    reference = eager(**{dim: 2 * heads}, **arguments)
    torch.manual_seed(0)
    first_forward = twin(**arguments)
    first_forward(*inputs)
    _same_state(first_forward, reference)

    torch.manual_seed(0)
    built = di.build(twin(**arguments), *inputs)
    _same_state(built, reference)
