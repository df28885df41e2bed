"""What ``di.build``'s examples become, and the dtype check eager's first forward
would make.

A shape-only example (a tuple of ints or ``torch.Size``) becomes a fake (or meta)
tensor in the dtype eager data would have for the model (:func:`example_dtype`), a
tensor example a fake one of its own shape, stride and dtype. Meta and fake kernels
check no dtypes, so the shape pass checks at each ``deferinit.nn`` twin's first call
what the eager forward would refuse (:func:`check_input_dtypes`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .._become._adopt import sizes_text
from .._declare._deferred import Deferred, placeholders_made
from .._declare._rules import describe
from .._errors import InferenceError
from .._naming import label

__all__ = ["check_input_dtypes", "example_dtype", "fakes", "has_shape", "layer_dtype"]


def _fake(example: Any, mode: Any, home: torch.device, dtype: torch.dtype, where: str) -> Any:
    """A meta or fake tensor for each example; a shape becomes one of ``dtype``.
    ``where`` names the example in messages (``argument 0``, ``keyword 'x'``)."""
    if isinstance(example, torch.Size) or (isinstance(example, tuple) and _is_shape(example)):
        return _from_shape(tuple(example), mode, home, dtype, where)
    if isinstance(example, torch.Tensor):
        if example.is_nested:
            raise InferenceError(
                f"di.build: example {where} is a nested tensor, which a shape-only pass "
                f"cannot stand in for (its sizes vary by entry). Nothing was built. Fix: "
                f"give a dense example of the same trailing sizes (a shape such as "
                f"(2, 5, {example.size(-1)}) or a meta tensor), or call the model on the "
                f"nested tensor itself: its first forward builds the layers."
            )
        device = home if home.type == "meta" or example.device.type == "meta" else example.device
        with mode:
            return torch.empty_strided(
                tuple(example.shape), tuple(example.stride()), dtype=example.dtype, device=device
            )
    if isinstance(example, list | tuple):
        return type(example)(
            _fake(e, mode, home, dtype, f"{where}[{i}]") for i, e in enumerate(example)
        )
    if isinstance(example, dict):
        return {k: _fake(v, mode, home, dtype, f"{where}[{k!r}]") for k, v in example.items()}
    return example


def fakes(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], mode: Any, home: torch.device, dtype: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`_fake` for every example, each named by its place in the call."""
    faked = tuple(_fake(a, mode, home, dtype, f"argument {i}") for i, a in enumerate(args))
    return faked, {k: _fake(v, mode, home, dtype, f"keyword {k!r}") for k, v in kwargs.items()}


def _is_shape(example: tuple[Any, ...]) -> bool:
    """Whether a tuple is taken for a shape: only numbers, at least one of them an
    int (a tuple of floats, ``(0.5, 2.0)``, is a value the forward takes)."""
    return (
        bool(example)
        and all(isinstance(s, int | float) for s in example)
        and any(isinstance(s, int) and not isinstance(s, bool) for s in example)
    )


def _from_shape(
    shape: tuple[Any, ...], mode: Any, home: torch.device, dtype: torch.dtype, where: str
) -> torch.Tensor:
    bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        negative = isinstance(bad[0], int) and not isinstance(bad[0], bool)
        kind = "a negative size" if negative else f"a size that is no int ({bad[0]!r})"
        raise InferenceError(
            f"di.build: example {where} is taken as a shape, and has {kind}: {shape!r}. A "
            f"shape holds non-negative ints only (a tuple of ints or torch.Size). Nothing "
            f"was built. Fix: give every size as an int >= 0, or pass a tensor (a meta one "
            f"allocates nothing)."
        )
    with mode:
        return torch.empty(shape, dtype=dtype, device=home)


def example_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a shape-only example takes: a shape says nothing of it, so the
    one an eager user's data would have for this model. Token ids
    (``torch.long``) where its first leaf layer in registration order takes
    indices (an ``nn.Embedding`` or ``nn.EmbeddingBag``, deferred or not); else
    that of its first floating parameter (else buffer) in registration order,
    where a deferred layer counts with the dtype it will be built in (its
    placeholders' where they were converted, else its declaration's, read without
    making a placeholder); torch's default dtype for a model with none.

    >>> from deferinit import nn as dnn
    >>> example_dtype(nn.Sequential(nn.ReLU(), dnn.Linear(4, dtype=torch.float64)))
    torch.float64
    >>> example_dtype(nn.Sequential(nn.Embedding(10, 4), dnn.Linear(3)))
    torch.int64
    >>> example_dtype(nn.ReLU())
    torch.float32
    """
    if issubclass(_class_of(_first_leaf(module)), _TAKE_INDICES):
        return torch.long
    with torch._C.DisableTorchFunctionSubclass():  # plain .dtype reads on Parameters
        for sub in module.modules():
            if isinstance(sub, Deferred):
                found = layer_dtype(sub)  # converted before the build (.double()) counts
            else:
                found = _floating_dtype(sub)
            if found is not None:
                return found
    return torch.get_default_dtype()


_TAKE_INDICES = (nn.Embedding, nn.EmbeddingBag)


def _first_leaf(module: nn.Module) -> nn.Module:
    """The first module without children in registration order (a deferred layer
    counts as one: its children hold placeholders)."""
    while not isinstance(module, Deferred):
        child = next((c for c in module._modules.values() if c is not None), None)
        if child is None:
            break
        module = child
    return module


def _class_of(module: nn.Module) -> type[nn.Module]:
    """The class a module is, or (deferred) becomes; a rank-generic twin's factory."""
    cls: type[nn.Module] = type(module)._di_cls if isinstance(module, Deferred) else type(module)
    return cls


def layer_dtype(layer: Deferred) -> torch.dtype | None:
    """The dtype of the deferred layer's first floating tensor once built: that of
    its placeholder where one was made (a conversion before the build, such as
    ``.double()``, changed it), else as declared."""
    if placeholders_made(layer):
        for sub in layer.modules():
            found = _floating_dtype(sub)
            if found is not None:
                return found
        return None
    return _declared_dtype(layer)


# The torch layers whose eager forward refuses an input of any dtype but their
# parameters' (outside autocast); the norms below; the others refuse integers only.
_SAME_DTYPE: frozenset[type[nn.Module]] = frozenset(
    [
        nn.Linear,
        nn.Bilinear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.PReLU,
        nn.RNN,
        nn.LSTM,
        nn.GRU,
        nn.RNNCell,
        nn.LSTMCell,
        nn.GRUCell,
        nn.MultiheadAttention,
        nn.Transformer,
        nn.TransformerEncoderLayer,
        nn.TransformerDecoderLayer,
        nn.AdaptiveLogSoftmaxWithLoss,
    ]
)
# The norms' eager forward (CPU) takes their parameters' dtype, or a bfloat16/float16
# input into float32 parameters (mixed precision); where they hold no tensor (no
# affine, no running statistics) any floating input. RMSNorm takes any.
_NORMS: frozenset[type[nn.Module]] = frozenset(
    [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    ]
)
_HALVES = (torch.bfloat16, torch.float16)
_TWINS_MODULE = "deferinit.nn"


def check_input_dtypes(copies: Iterable[nn.Module], *, integers_only: bool = False) -> None:
    """Make each deferred twin of ``deferinit.nn`` in the shadow refuse, at its
    first call, an input whose dtype its eager forward refuses: meta and fake
    kernels do not check dtypes, the first forward does. Classes made with
    ``di.defer`` are the user's, and may take integers: not checked.
    ``integers_only``: where examples were given as shapes, whose floating dtype is a
    guess (:func:`example_dtype`), only an integer input to a floating layer is
    refused (the model's own code made it: ``x.long()``)."""
    hook = functools.partial(_refuse_dtype, integers_only=integers_only)
    for module in copies:
        if isinstance(module, Deferred) and type(module).__module__ == _TWINS_MODULE:
            # Last: after the user's own pre-hooks, which may convert the input.
            module.register_forward_pre_hook(hook, with_kwargs=True)


def _refuse_dtype(
    layer: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    integers_only: bool = False,
) -> None:
    if not isinstance(layer, Deferred):
        return  # built earlier in this pass, once checked
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, PackedSequence):
        x = x.data
    if not isinstance(x, torch.Tensor):
        return
    expected = layer_dtype(layer)
    if (x.is_floating_point() or x.is_complex()) and integers_only:
        return
    if x.is_floating_point() or x.is_complex():
        classes = getattr(_class_of(layer), "classes", (_class_of(layer),))
        if expected is None or x.dtype == expected or _autocast(x):
            return
        if all(c in _NORMS for c in classes):
            if expected == torch.float32 and x.dtype in _HALVES:
                return  # mixed precision, which the norms take
        elif not all(c in _SAME_DTYPE for c in classes):
            return
        fix = (
            f"pass an example of dtype {_dtype_text(expected)}, give a shape instead (it takes "
            f"the model's dtype), or convert the model to the data's dtype before the build"
        )
    else:
        fix = (
            "pass a floating-point example (token ids go to an nn.Embedding first), or "
            "give a shape instead (it takes the model's dtype)"
        )
    values = layer.infer(args, kwargs)  # an input it cannot read sizes off: that error first
    built_from = ", ".join(describe(a) for a in args) or "keyword arguments"
    takes = f"a {_dtype_text(expected)}" if expected is not None else "a floating-point"
    raise InferenceError(
        f"{label(layer)}: built with {sizes_text(values)} from {built_from}, but its forward "
        f"then fails: it takes {takes} input (its parameters' dtype) and got "
        f"{_dtype_text(x.dtype)}, which eager torch refuses at the first forward (a shape-only "
        f"pass does not compute, so torch checks no dtype there). Nothing was built. Fix: "
        f"{fix}."
    )


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _autocast(x: torch.Tensor) -> bool:
    """Whether autocast is on (for the CPU, CUDA or ``x``'s device), under which an
    eager forward takes a floating input of another dtype than the layer's."""
    kinds = {"cpu", "cuda", x.device.type} - {"meta"}
    return any(torch.is_autocast_enabled(kind) for kind in kinds)


def has_shape(example: Any) -> bool:
    """Whether a shape is among the examples: its dtype is deferinit's choice."""
    if isinstance(example, torch.Size) or (isinstance(example, tuple) and _is_shape(example)):
        return True
    if isinstance(example, list | tuple):
        return any(map(has_shape, example))
    if isinstance(example, dict):
        return any(map(has_shape, example.values()))
    return False


def _floating_dtype(module: nn.Module) -> torch.dtype | None:
    d = module.__dict__
    tables: tuple[dict[str, torch.Tensor | None] | None, ...] = (
        d.get("_parameters"),
        d.get("_buffers"),
    )
    for table in tables:
        for t in (table or {}).values():
            if t is not None and t.dtype.is_floating_point:
                return t.dtype
    return None


def _declared_dtype(layer: Deferred) -> torch.dtype | None:
    """The dtype of the deferred layer's first floating tensor as declared, read
    off its declaration (making no placeholder)."""
    state = layer.__dict__["_di"]
    layout = state.layout
    if layout is not None:
        dtypes = (t.dtype for t in layout.tensors if t.dtype is not None)
        return next((d for d in dtypes if d.is_floating_point), None)
    dtype = state.arguments.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
