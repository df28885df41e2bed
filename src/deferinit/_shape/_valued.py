"""Forwards that depend on tensor values, in di.build's shape-only pass.

The pass has shapes and no values: an operation whose output's shape depends on
values (``nonzero``, boolean indexing) or that reads one (``.item()``, ``if t:``)
cannot run on meta or fake tensors. The torch layers known to need one have a
shape function in :data:`SHAPE_FUNCTIONS`, which gives their output from the
input's shapes instead of running the forward; :func:`answer_from_shapes` puts
them in place in the pass's shadow of the model (deferred ones are built there
first, so their sizes are recorded as any layer's). Any other such forward fails
with :func:`reads_values`' error, which names the layer and the ways out.

>>> import torch
>>> from torch import nn
>>> layer = nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8], device="meta")
>>> out = _adaptive_log_softmax(layer, (torch.empty(4, 16, device="meta"),
...                                     torch.empty(4, dtype=torch.long, device="meta")), {})
>>> tuple(out.output.shape), tuple(out.loss.shape)
((4,), ())
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
)
from torch.nn.modules.adaptive import _ASMoutput

from .._become._adopt import sizes_text
from .._become._become import become
from .._become._memo import SHAPE_PASS
from .._declare._deferred import Deferred
from .._declare._rules import describe
from .._errors import InferenceError
from .._naming import label

__all__ = ["SHAPE_FUNCTIONS", "answer_from_shapes", "reads_values"]

# (layer, forward's positional arguments, its keyword arguments) -> its output
ShapeFunction = Callable[[nn.Module, tuple[Any, ...], Mapping[str, Any]], Any]


def _adaptive_log_softmax(
    layer: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> _ASMoutput:
    """``nn.AdaptiveLogSoftmaxWithLoss``: it picks each cluster's rows by target
    value. Its checks on shapes run as in its forward, then its head (which checks
    the input's width); the output has the target's batch shape and the input's
    dtype, the loss is a scalar."""
    bound = _ADAPTIVE_FORWARD.bind(layer, *args, **kwargs)
    input_, target_ = bound.arguments["input_"], bound.arguments["target_"]
    targ_dim = target_.dim()
    # torch's own messages, checked in torch's order
    if targ_dim == 1:
        if input_.size(0) != target_.size(0):
            raise RuntimeError("Input and target should have the same size in the batch dimension.")
        if input_.dim() != 2:
            raise RuntimeError(
                f"1D target tensor expects 2D input tensors, but found inputs with size "
                f"{input_.size()}"
            )
    elif targ_dim == 0:
        if input_.dim() != 1:
            raise RuntimeError(
                f"0D target tensor expects 1D input tensors, but found inputs with size "
                f"{input_.size()}"
            )
    else:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    head: nn.Module = layer.head  # type: ignore[assignment]  # a Linear
    head(input_ if targ_dim else input_.unsqueeze(0))
    output = input_.new_empty(tuple(target_.shape))
    return _ASMoutput(output, input_.new_empty(()))


_ADAPTIVE_FORWARD = inspect.signature(nn.AdaptiveLogSoftmaxWithLoss.forward)

# Layers by exact class (a subclass may have its own forward), deferred ones by
# the class they become.
SHAPE_FUNCTIONS: dict[type[nn.Module], ShapeFunction] = {
    nn.AdaptiveLogSoftmaxWithLoss: _adaptive_log_softmax,
}


def answer_from_shapes(copies: Iterable[nn.Module]) -> None:
    """Give each module of the shadow whose class has a shape function that
    function as its ``forward`` (a deferred one is built by its first call)."""
    for module in copies:
        cls = type(module)._di_cls if isinstance(module, Deferred) else type(module)
        shape = SHAPE_FUNCTIONS.get(cls)
        if shape is not None:
            module.__dict__["forward"] = _forward(module, shape)


def _forward(module: nn.Module, shape: ShapeFunction) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(module, Deferred):
            return shape(module, args, kwargs)
        # Not an attribute of the user's that the build would keep or refuse.
        del module.__dict__["forward"]
        values, built_from = _build(module, args, kwargs)
        module.__dict__["forward"] = forward  # in the built layer's __dict__
        try:
            return shape(module, args, kwargs)
        except Exception as error:
            raise InferenceError(
                f"{label(module)}: built with {sizes_text(values)} from {built_from}, but "
                f"its forward then failed: {type(error).__name__}: {error}. The layer is "
                f"left unbuilt. Fix: pass the input the layer expects, then call again."
            ) from error

    return forward


def _build(
    layer: Deferred, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], str]:
    """Build ``layer`` in the pass as its first forward would (with fake tensors,
    on the input's device, no initializer), and record it for di.build."""
    recorder = SHAPE_PASS.get()
    assert recorder is not None  # only the shape-only pass installs these
    values = layer.infer(args, dict(kwargs))
    built_from = ", ".join(describe(a) for a in args) or "keyword arguments"
    given = [*args, *kwargs.values()]
    device = next((a.device for a in given if isinstance(a, torch.Tensor)), None)
    txn = become(layer, values, built_from=built_from, device=device, adopt=False)
    recorder.records.append((layer, values, built_from, txn))
    return values, built_from


def reads_values(
    error: BaseException, root: nn.Module, names: Mapping[int, str]
) -> InferenceError | None:
    """The error for a shape-only pass that failed because a forward depends on
    tensor values (``error`` is torch's, or was raised from it), naming the
    innermost layer of ``names`` (by ``id``, below ``root``) whose forward was
    running; None for any other failure."""
    found: BaseException | None = error
    while found is not None and not isinstance(
        found, DataDependentOutputException | DynamicOutputShapeException
    ):
        found = found.__cause__
    if found is None:
        return None
    layer, name = root, ""
    tb: types.TracebackType | None = found.__traceback__
    while tb is not None:
        self = tb.tb_frame.f_locals.get("self")
        if isinstance(self, nn.Module) and id(self) in names:
            layer, name = self, names[id(self)]
        tb = tb.tb_next
    where = f"{type(layer).__name__} layer {name!r}" if name else type(layer).__name__
    return InferenceError(
        f"di.build: the forward of {where} reads tensor values "
        f"({getattr(found, 'func', found)}): it depends on data values, not only on "
        f"shapes, and a shape-only pass has shapes only (it runs on meta or fake "
        f"tensors). Nothing was built. Fix: build by a real first "
        f"forward (model(example)) instead, or give the deferred layers' sizes explicitly "
        f"(e.g. dnn.Linear(10, in_features=256)), so that they build at once."
    )
