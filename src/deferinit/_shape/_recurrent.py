"""Shapes of torch's fused recurrent kernels, answered without running them.

torch has no fast shape function for ``torch.lstm``, ``torch.gru``,
``torch.rnn_tanh`` and ``torch.rnn_relu``: on meta (and under FakeTensorMode)
they unroll into one Python meta kernel per gate, step, layer and direction,
so a 32-step GRU costs about 200 ms where the real forward costs 2 ms. During
di.build's shape-only pass :class:`RecurrentShapes` answers these four calls
from the shapes of their arguments: the outputs are empty tensors of the shapes,
strides and dtype the kernel gives. Everything around the kernel (the module's
own checks, unbatched inputs, packed sequences, the initial state) runs as in
eager; any call that is not exactly what the kernel accepts (another dtype,
mismatched weights, a real input) goes to the kernel itself, whose answer or
error stands.

>>> import torch
>>> from torch import nn
>>> gru = nn.GRU(28, 32, batch_first=True, device="meta")
>>> with RecurrentShapes():
...     out, h = gru(torch.empty(4, 35, 28, device="meta"))
>>> tuple(out.shape), out.stride(), tuple(h.shape)
((4, 35, 32), (32, 128, 1), (1, 4, 32))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode

__all__ = ["RecurrentShapes"]

# kernel -> gates per hidden unit (rows of weight_ih per hidden unit)
_GATES: dict[Any, int] = {torch.lstm: 4, torch.gru: 3, torch.rnn_tanh: 1, torch.rnn_relu: 1}


class RecurrentShapes(TorchFunctionMode):
    """While active, the recurrent kernels on meta or fake inputs return empty
    outputs of the right shapes instead of running step by step."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        gates = _GATES.get(func)
        if gates is not None and not kwargs:
            answer = _outputs(gates, tuple(args))
            if answer is not None:
                return answer
        return func(*args, **(kwargs or {}))


def _outputs(gates: int, args: tuple[Any, ...]) -> tuple[torch.Tensor, ...] | None:
    """The kernel's outputs for ``args``, or None when only the kernel can say."""
    if len(args) != 9:
        return None
    packed = isinstance(args[3], list | tuple)  # (data, batch_sizes, hx, params, ...)
    if packed:
        data, batch_sizes, hx, params, biases, layers, _, _, bidirectional = args
        batch_first = False
    else:
        data, hx, params, biases, layers, _, _, bidirectional, batch_first = args
        batch_sizes = None
    states = _states(hx, gates)
    if (
        states is None
        or not isinstance(data, torch.Tensor)
        or not _shape_only(data)
        or not isinstance(params, list | tuple)
        or not all(isinstance(p, torch.Tensor) for p in params)
        or not isinstance(layers, int)
        or layers < 1
    ):
        return None
    tensors = [data, *states, *params]
    if any(t.dtype != data.dtype or t.device != data.device for t in tensors[1:]):
        return None
    if not all(_shape_only(s) for s in states):
        return None
    sizes = _sizes(data, batch_sizes, batch_first)
    if sizes is None:
        return None
    steps, batch = sizes
    directions = 2 if bidirectional else 1
    widths = _widths(params, gates, bool(biases), layers, directions, data.shape[-1])
    if widths is None:
        return None
    hidden, out = widths
    expected = [(layers * directions, batch, out)] + [(layers * directions, batch, hidden)] * (
        len(states) - 1
    )
    if [tuple(s.shape) for s in states] != expected:
        return None
    if packed:
        output = data.new_empty((data.shape[0], directions * out))
    else:
        output = data.new_empty((steps, batch, directions * out))
        if batch_first:
            output = output.transpose(0, 1)  # (N, L, D*out), the kernel's strides
    return (output, *(s.new_empty(s.shape) for s in states))


def _states(hx: Any, gates: int) -> list[torch.Tensor] | None:
    """The initial states: (h, c) for an LSTM, h for the others."""
    if gates == 4:
        if isinstance(hx, list | tuple) and len(hx) == 2:
            if all(isinstance(h, torch.Tensor) for h in hx):
                return list(hx)
        return None
    return [hx] if isinstance(hx, torch.Tensor) else None


def _shape_only(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or isinstance(t, FakeTensor)


def _sizes(data: torch.Tensor, batch_sizes: Any, batch_first: Any) -> tuple[int, int] | None:
    """(steps, batch) of the input; None when the kernel should judge it."""
    if batch_sizes is None:
        if data.dim() != 3 or 0 in data.shape:
            return None
        return (data.shape[1], data.shape[0]) if batch_first else (data.shape[0], data.shape[1])
    if (
        not isinstance(batch_sizes, torch.Tensor)
        or _shape_only(batch_sizes)
        or batch_sizes.dim() != 1
        or batch_sizes.numel() == 0
        or data.dim() != 2
        or 0 in data.shape
    ):
        return None
    if int(batch_sizes.sum()) != data.shape[0]:
        return None
    return batch_sizes.numel(), int(batch_sizes[0])


def _widths(
    params: Sequence[torch.Tensor],
    gates: int,
    biases: bool,
    layers: int,
    directions: int,
    features: int,
) -> tuple[int, int] | None:
    """(hidden_size, output size per direction) when ``params`` are exactly the
    weights the kernel takes, in torch's order (per layer and direction:
    weight_ih, weight_hh, [bias_ih, bias_hh], [weight_hr]); else None."""
    per = 4 if biases else 2
    groups = layers * directions
    if len(params) == groups * (per + 1) and gates == 4:
        per += 1  # LSTM with projections
    elif len(params) != groups * per:
        return None
    projected = per in (3, 5)
    w_hh = params[1]
    if w_hh.dim() != 2 or w_hh.shape[0] % gates or w_hh.shape[0] == 0:
        return None
    hidden = w_hh.shape[0] // gates
    out = params[per - 1].shape[0] if projected else hidden
    for group in range(groups):
        first = features if group < directions else directions * out
        w = params[group * per : (group + 1) * per]
        shapes: list[tuple[int, ...]] = [(gates * hidden, first), (gates * hidden, out)]
        shapes += [(gates * hidden,)] * (2 if biases else 0)
        shapes += [(out, hidden)] if projected else []
        if [tuple(p.shape) for p in w] != shapes:
            return None
    return hidden, out
