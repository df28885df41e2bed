"""Every twin fuzzed with hostile first inputs (docs/design.md §3.5, §3.10).

Each case of ``test_layers.CASES`` (every twin, several configurations) gets first
inputs (and, for layers of several arguments, other arguments) of ranks 0-6 in six
dtypes, zero sizes, non-contiguous, strided and channels_last layouts, non-tensors,
and PackedSequences for the recurrent layers.
The property: either the twin builds and then equals, bitwise, the eager layer
constructed with the sizes it inferred under the same seed (parameters, buffers
and output), or it raises a ``DeferredInitError`` (or, for a layer built at
construction, torch's own error that the eager layer raises too) and is left
exactly as it was, after which the case's valid input builds it as eager.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import deferinit as di
import test_layers as layers
from deferinit._declare._deferred import Deferred

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last"]
NON_TENSORS: list[Any] = [None, "input", [1.0, 2.0, 3.0], {"x": 1}, 3, [torch.ones(2, 3)]]
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)


def _values(shape: list[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype is torch.int64:
        return torch.randint(-3, 4, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


def _laid_out(x: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """The same shape and values class, in a memory layout other than the default."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and x.dim() >= 1:
        wide = _values([*x.shape[:-1], 2 * x.shape[-1]], x.dtype, seed)
        return wide[..., ::2]
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


@st.composite
def first_inputs(draw: st.DrawFn, case: layers.Case) -> Any:
    kinds = ["tensor"] * 6 + ["non-tensor"]
    if case.cls in RECURRENT:
        kinds.append("packed")
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    if kind == "non-tensor":
        return draw(st.sampled_from(NON_TENSORS))
    if kind == "packed":
        steps, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        features = draw(st.integers(0, 7))
        lengths = sorted(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
        x = _values([steps, batch, max(features, 1)], torch.float32, seed)
        packed = pack_padded_sequence(x, lengths[::-1])
        if features == 0:  # torch will not pack an empty tensor; it can hold one
            return PackedSequence(packed.data[:, :0], packed.batch_sizes)
        return packed
    rank = draw(st.integers(0, 6))
    largest = 7 if rank <= 3 else 3
    shape = draw(st.lists(st.integers(0, largest), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    return _laid_out(_values(shape, dtype, seed), layout, seed)


def _shown(value: Any) -> str:
    if isinstance(value, PackedSequence):
        return f"PackedSequence(data={tuple(value.data.shape)}, sizes={value.batch_sizes.tolist()})"
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype} stride={value.stride()}"
    return repr(value)


def _same(got: Any, want: Any) -> None:
    """Bitwise equal (NaN where eager has NaN), of the same types, dtypes and shapes."""
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    elif isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    else:
        assert got == want


def _same_state(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        _same(got_state[key], value)


def _snapshot(layer: nn.Module) -> tuple[Any, ...]:
    tensors = layer.state_dict(keep_vars=True)
    return type(layer), repr(layer), [(k, id(v)) for k, v in tensors.items()], tensors


def _sizes(layer: nn.Module) -> dict[str, Any]:
    values: dict[str, Any] = layer.__dict__["_di"].values
    return values


CASES = [pytest.param(c, id=c.id, marks=c.marks) for c in layers.CASES]


@pytest.mark.parametrize("case", CASES)
@settings(
    derandomize=True,
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_twin_given_any_first_input_equals_eager_or_is_left_unchanged(
    case: layers.Case, data: st.DataObject
) -> None:
    valid = case.inputs()
    # The first input above all; the others (key, value, target, ...) too.
    position = data.draw(st.sampled_from([0, 0, *range(len(valid))]), label="position")
    hostile = data.draw(first_inputs(case), label="input")
    args = (*valid[:position], hostile, *valid[position + 1 :])
    note(f"argument {position}: {_shown(hostile)}")
    layer = layers.twin(case)
    before = _snapshot(layer)
    seed = data.draw(st.integers(0, 1000), label="seed")
    torch.manual_seed(seed)
    try:
        got = layer(*args)
    except di.DeferredInitError as error:
        note(f"deferinit: {error}")
    except Exception as error:
        note(f"torch: {type(error).__name__}: {error}")
        # torch's own error only from a layer built before this call, and only as eager.
        assert not issubclass(before[0], Deferred), error
        torch.manual_seed(seed)
        eager = case.cls(**_sizes(layer), **case.kwargs)
        with pytest.raises(type(error)):
            eager(*args)
    else:
        torch.manual_seed(seed)
        eager = case.cls(**_sizes(layer), **case.kwargs)
        _same(got, eager(*args))
        _same_state(layer, eager)
        assert type(layer) is case.cls
        return
    cls, text, ids, _ = before
    assert type(layer) is cls
    assert repr(layer) == text
    assert [(k, id(v)) for k, v in layer.state_dict(keep_vars=True).items()] == ids
    # A corrected call then builds the layer as eager, under the same seed.
    good = case.inputs()
    torch.manual_seed(seed)
    got = layer(*good)
    torch.manual_seed(seed)
    eager = layers.eager(case)
    _same(got, eager(*good))
    _same_state(layer, eager)
