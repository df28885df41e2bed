"""Equivalence as a property (docs/design.md §3.3): for random ``nn.Sequential`` stacks of
deferred layers, activations, pooling and ``Flatten`` fed a random valid input, the
deferred model equals the eager model written with explicit sizes, bitwise, under
the same seed: outputs, parameters and running statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Pair = tuple[Callable[[], nn.Module], Callable[[], nn.Module]]


def _same(make: Callable[[], nn.Module]) -> Pair:
    return make, make


def _draw_layer(data: Any, shape: list[int]) -> tuple[Pair, list[int]]:
    """One layer valid for an input of ``shape`` (batch first), and its output shape."""
    rank = len(shape)
    kinds = ["linear", "relu", "tanh"]
    if rank == 2:
        kinds.append("batchnorm")
    if rank in (3, 4):
        kinds += ["conv", "batchnorm", "flatten"]
        if min(shape[2:]) >= 2:
            kinds.append("maxpool")
    kind = data.draw(st.sampled_from(kinds))
    if kind == "relu":
        return _same(nn.ReLU), shape
    if kind == "tanh":
        return _same(nn.Tanh), shape
    if kind == "flatten":
        flat = 1
        for size in shape[1:]:
            flat *= size
        return _same(nn.Flatten), [shape[0], flat]
    if kind == "maxpool":
        pool = nn.MaxPool1d if rank == 3 else nn.MaxPool2d
        return _same(lambda: pool(2)), [*shape[:2], *(s // 2 for s in shape[2:])]
    if kind == "linear":
        out = data.draw(st.integers(1, 6), label="out_features")
        bias = data.draw(st.booleans(), label="bias")
        fan_in = shape[-1]
        return (
            (lambda: dnn.Linear(out, bias=bias), lambda: nn.Linear(fan_in, out, bias=bias)),
            [*shape[:-1], out],
        )
    if kind == "batchnorm":
        channels = shape[1]
        if rank == 4:
            return (dnn.BatchNorm2d, lambda: nn.BatchNorm2d(channels)), shape
        return (dnn.BatchNorm1d, lambda: nn.BatchNorm1d(channels)), shape
    # conv
    out = data.draw(st.integers(1, 4), label="out_channels")
    kernel = data.draw(st.integers(1, min(3, *shape[2:])), label="kernel_size")
    padding = data.draw(st.integers(0, 1), label="padding")
    bias = data.draw(st.booleans(), label="bias")
    channels = shape[1]
    conv = nn.Conv1d if rank == 3 else nn.Conv2d
    twin = dnn.Conv1d if rank == 3 else dnn.Conv2d
    spatial = [s + 2 * padding - kernel + 1 for s in shape[2:]]
    return (
        (
            lambda: twin(out, kernel, padding=padding, bias=bias),
            lambda: conv(channels, out, kernel, padding=padding, bias=bias),
        ),
        [shape[0], out, *spatial],
    )


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_sequential_equals_eager_bitwise(data: Any) -> None:
    rank = data.draw(st.sampled_from([2, 3, 4]), label="input rank")
    batch = data.draw(st.integers(2, 3), label="batch")
    features = data.draw(st.integers(1, 5), label="features or channels")
    spatial = data.draw(st.lists(st.integers(3, 7), min_size=rank - 2, max_size=rank - 2))
    shape = [batch, features, *spatial]
    input_shape = list(shape)
    pairs: list[Pair] = []
    for _ in range(data.draw(st.integers(1, 6), label="depth")):
        pair, shape = _draw_layer(data, shape)
        pairs.append(pair)
    note(f"input shape {input_shape}")

    x = torch.randn(*input_shape)
    torch.manual_seed(0)
    lazy = nn.Sequential(*(deferred() for deferred, _ in pairs))
    lazy_out = lazy(x)
    torch.manual_seed(0)
    ref = nn.Sequential(*(eager() for _, eager in pairs))
    ref_out = ref(x)

    assert di.is_built(lazy)
    assert repr(lazy) == repr(ref)
    assert [type(m) for m in lazy.modules()] == [type(m) for m in ref.modules()]
    assert list(lazy_out.shape) == shape
    assert torch.equal(lazy_out, ref_out)
    lazy_state, ref_state = lazy.state_dict(), ref.state_dict()
    assert list(lazy_state) == list(ref_state)
    for key, value in ref_state.items():
        assert lazy_state[key].dtype == value.dtype, key
        assert torch.equal(lazy_state[key], value), key
    second = torch.randn(*input_shape)
    assert torch.equal(lazy(second), ref(second))
