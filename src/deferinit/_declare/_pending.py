"""Init code on a deferred layer's placeholder waits for its sizes (docs/design.md §3.3).

``layer.weight.data.normal_(0, 0.01)`` before the build must not run on nothing
(torch's lazy placeholders answer ``.data`` with an empty tensor, so the call is
silently lost). A placeholder instead answers ``.data`` with itself and queues
every in-place call made on it (a ``Tensor`` method ending in ``_``, or a
``torch.nn.init`` function that dispatches on its tensor); the queue runs on the
real tensor, the same Python object, right after the layer is constructed.
Anything that needs the sizes or values now raises :class:`NotBuiltError`.

A placeholder also remembers the dtypes it was converted through (``DTYPES``):
eager's ``.half().float()`` after construction rounds every value to half
precision and back, so the built tensor is converted through the same dtypes
(:func:`convert_through`), not only put in the last one.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._errors import NotBuiltError
from .._naming import label
from ._recording import HOOKS

__all__ = [
    "DTYPES",
    "Call",
    "WaitingCall",
    "convert_through",
    "dtypes_passed",
    "owner_of",
    "pending_calls",
    "run_pending",
    "set_owner",
    "refuse",
    "take_pending",
    "waiting_torch_function",
]

# (program-order number, function, args, kwargs)
Call = tuple[int, Any, tuple[Any, ...], dict[str, Any]]
_numbers = itertools.count()  # next() is atomic under the GIL

QUEUE = "_di_pending"  # in the placeholder's __dict__, which survives becoming real
_OWNER = "_di_owner"  # (weak reference to the deferred layer, name within it)
# In-place by name, but not initialization: they stay torch's (allowed or refused).
_NOT_INIT = {"requires_grad_", "share_memory_", "retain_grad_", "set_", "resize_"}
_DATA = torch.Tensor.data
# In the placeholder's __dict__: the dtypes it was converted through, the one it had
# before the first conversion first and its current one last (absent: none).
DTYPES = "_di_dtypes"
_DETACH = torch._C.TensorBase.detach
# Sizes a placeholder does not have yet: asked for, they raise (as .shape does).
_SIZES = frozenset({torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension})
_SIZE_PROPERTIES = frozenset({torch.Tensor.ndim})


def set_owner(tensor: torch.Tensor, layer: nn.Module, name: str) -> None:
    """Remember which layer a placeholder belongs to, for error messages."""
    tensor.__dict__[_OWNER] = (weakref.ref(layer), name)


def owner_of(tensor: torch.Tensor) -> tuple[nn.Module | None, str]:
    """The deferred layer a placeholder belongs to (``None`` if unknown or gone) and
    the tensor's name within it."""
    note = tensor.__dict__.get(_OWNER)
    return (note[0](), note[1]) if note else (None, "")


def pending_calls(tensor: torch.Tensor) -> list[Call]:
    """The in-place calls waiting on ``tensor``, oldest first (empty if none)."""
    queue: list[Call] = tensor.__dict__.get(QUEUE, [])
    return queue


def take_pending(tensor: torch.Tensor, *, keep_queue: bool) -> dict[str, Any]:
    """Remove the owner note (a weak reference would not pickle with the built
    tensor) and, unless ``keep_queue``, the waiting calls (kept on meta for
    ``di.materialize``); returns what was removed (:func:`run_pending` takes it, a
    rollback puts it back). The dtypes passed stay: after ``di.reset`` the next
    build converts through them again, as the first did."""
    removed = {_OWNER: tensor.__dict__.pop(_OWNER)} if _OWNER in tensor.__dict__ else {}
    if not keep_queue and QUEUE in tensor.__dict__:
        removed[QUEUE] = tensor.__dict__.pop(QUEUE)
    return removed


def dtypes_passed(tensor: torch.Tensor) -> tuple[torch.dtype, ...]:
    """The dtypes a placeholder was converted through, from the one it had before
    (the constructor's) to its current one; ``()`` if it never changed dtype, or
    only through steps that keep every value and back (``.double().float()``).

    >>> import torch
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4).half().float()
    >>> dtypes_passed(layer.weight)
    (torch.float32, torch.float16, torch.float32)
    >>> dtypes_passed(dnn.Linear(4).double().float().weight)
    ()
    """
    passed: tuple[torch.dtype, ...] = tensor.__dict__.get(DTYPES, ())
    return passed


def convert_through(data: torch.Tensor, passed: tuple[torch.dtype, ...]) -> torch.Tensor:
    """``data``, constructed in ``passed[0]``, converted through every later dtype of
    ``passed`` (:func:`dtypes_passed`), as eager's conversions after construction
    would have converted it.

    >>> import torch
    >>> x = torch.tensor([1 / 3])
    >>> convert_through(x, (torch.float32, torch.float16, torch.float32)).item()
    0.333251953125
    """
    for dtype in passed[1:]:
        data = data.to(dtype=dtype)
    return data


def _passed(
    passed: tuple[torch.dtype, ...], before: torch.dtype, after: torch.dtype
) -> tuple[torch.dtype, ...]:
    """``passed`` after one more conversion, from ``before`` to ``after``. A return
    to the dtype before a step that kept every value (float32 -> float64 -> float32)
    undoes that step."""
    if before == after:
        return passed
    steps = passed or (before,)
    if len(steps) >= 2 and steps[-2] == after and _keeps_every_value(after, before):
        steps = steps[:-1]
    else:
        steps = (*steps, after)
    return steps if len(steps) > 1 else ()


def _keeps_every_value(source: torch.dtype, target: torch.dtype) -> bool:
    """Every ``source`` value is exactly a ``target`` value (float16 -> float32)."""
    if not (source.is_floating_point and target.is_floating_point):
        return False
    a, b = torch.finfo(source), torch.finfo(target)
    return b.eps <= a.eps and b.max >= a.max and b.smallest_normal <= a.smallest_normal


def _note_passed(tensor: torch.Tensor, passed: tuple[torch.dtype, ...]) -> None:
    if passed:
        tensor.__dict__[DTYPES] = passed
    else:
        tensor.__dict__.pop(DTYPES, None)


def run_pending(calls: list[Call], swap: Mapping[int, torch.Tensor] | None = None) -> None:
    """Run ``calls`` in program order (across tensors too); ``swap`` maps a
    placeholder's id to the tensor the call runs on instead (materialize's copy)."""
    swap = swap or {}

    def fix(x: Any) -> Any:
        return swap.get(id(x), x) if isinstance(x, torch.Tensor) else x

    with torch.no_grad():
        for _, func, args, kwargs in sorted(calls, key=lambda call: call[0]):
            func(*[fix(a) for a in args], **{k: fix(v) for k, v in kwargs.items()})


def _waits(func: Any) -> bool:
    """An in-place initialization that can run once the sizes are known."""
    name: str = getattr(func, "__name__", "")
    if getattr(func, "__module__", None) == "torch.nn.init":
        return name.endswith("_") and not name.startswith("_")
    return (
        name.endswith("_")
        and not name.startswith("_")
        and name not in _NOT_INIT
        and type(func).__name__ == "method_descriptor"
    )


def _operation(func: Any) -> str:
    """The operation for the message: the ``torch.nn.init`` function being run,
    when the failing call comes from inside one (its sizes computation)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "torch.nn.init":
            public = frame.f_code.co_name
            if not public.startswith("_"):
                return f"torch.nn.init.{public}"
        frame = frame.f_back  # type: ignore[assignment]
    if isinstance(func, str):
        return func
    return str(getattr(func, "__qualname__", None) or getattr(func, "__name__", func))


_TORCH_MODULE = "torch.nn.modules.module"


def _loaded_into_built(tensor: Any) -> NotBuiltError | None:
    """A placeholder saved in a checkpoint (before its layer was built) whose shape
    torch's loader of a built layer reads: the key, the layer and the fix."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "_load_from_state_dict"
            and frame.f_globals.get("__name__") == _TORCH_MODULE
            and frame.f_locals.get("input_param") is tensor
        ):
            layer, prefix = frame.f_locals.get("self"), str(frame.f_locals.get("prefix", ""))
            key = str(frame.f_locals.get("key", ""))
            kind = type(layer).__name__
            where = f"{kind} layer {prefix[:-1]!r}" if prefix else kind
            return NotBuiltError(
                f"{where}: load_state_dict: the checkpoint holds a placeholder for {key!r} "
                f"(saved before the layer was built, so it has no values), the model's layer "
                f"is built. Fix: save the checkpoint after the "
                f"build (a forward pass or di.build, then state_dict()), or load it into an "
                f"unbuilt model."
            )
        frame = frame.f_back  # type: ignore[assignment]
    return None


def refuse(tensor: Any, func: Any) -> NotBuiltError:
    if (error := _loaded_into_built(tensor)) is not None:
        return error
    owner = tensor.__dict__.get(_OWNER) if isinstance(tensor, torch.Tensor) else None
    layer = owner[0]() if owner else None
    where = (
        f"{label(layer)}, tensor {owner[1]!r}"
        if layer is not None and owner
        else "a deferred layer"
    )
    op = _operation(func)
    return NotBuiltError(
        f"{where}: {op} needs the tensor's sizes or values, which are unknown until "
        f"the layer is built. In-place initialization (weight.data.normal_(0, 0.01), "
        f"nn.init.zeros_(bias), fill_ under torch.no_grad()) waits and runs right after "
        f"the build; this operation cannot wait. Fix: call it after the first forward or "
        f"di.build(model, example), or register it with di.initialize(layer, init)."
    )


def waiting_torch_function(
    cls: Any, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> Any:
    """The placeholders' ``__torch_function__``: ``.data`` is the placeholder, in-place
    initialization waits, torch's allowed calls and properties pass, the rest raise."""
    kwargs = kwargs or {}
    # torch.nn.init functions hand their tensor over as a keyword.
    target = args[0] if args else kwargs.get("tensor")
    wrapper = type(func).__name__ == "method-wrapper"
    if wrapper and func.__self__ is _DATA and isinstance(target, cls):
        if func.__name__ == "__get__":
            return target  # so that in-place init on .data waits too
        if func.__name__ == "__set__":
            # placeholder.data = converted (nn.Module._apply): the dtype it passes
            # through is noted, so the built tensor is rounded through it as well.
            with torch._C.DisableTorchFunctionSubclass():
                before, after = target.dtype, args[1].dtype
            result = _default(cls, func, types, args, kwargs)
            _note_passed(target, _passed(dtypes_passed(target), before, after))
            return result
    if isinstance(target, cls) and _waits(func):
        call = (next(_numbers), func, args, dict(kwargs))
        # Inside di.deferred_init the record keeps the program order (replayed here).
        if HOOKS.queued is not None or not _after_applied(target, call):
            target.__dict__.setdefault(QUEUE, []).append(call)
        if HOOKS.queued is not None:
            HOOKS.queued(target, call)
        return target
    if isinstance(target, cls) and (
        func in _SIZES
        or (wrapper and func.__self__ in _SIZE_PROPERTIES and func.__name__ == "__get__")
    ):
        # torch's lazy placeholders answer these with an empty tensor's sizes (0), on
        # which init code computes silently wrong values (fan-in 0, a skipped branch).
        name = func.__self__.__name__ if wrapper else func.__name__
        raise refuse(target, f"Tensor.{name}")
    if func is _DETACH and isinstance(target, cls):
        # Parameter(placeholder) detaches its argument: nn.Module._apply does that when
        # moving a parameter to a device it cannot share storage with (.to("meta")).
        # The copy is a placeholder of the same layer, its waiting calls included.
        copy = _default(cls, func, types, args, kwargs)
        _inherit(copy, target)
        return copy
    if func in cls._allowed_methods or wrapper:
        result = _default(cls, func, types, args, kwargs)
        if isinstance(result, cls) and result is not target and isinstance(target, cls):
            # A conversion (.half(), .to(...)): the copy waits for the same init calls
            # and knows the dtypes passed, so that a Parameter made of it
            # (nn.Module._apply to meta) does too.
            _inherit(result, target)
            with torch._C.DisableTorchFunctionSubclass():
                before, after = target.dtype, result.dtype
            _note_passed(result, _passed(dtypes_passed(target), before, after))
        return result
    raise refuse(target, func)


class WaitingCall:
    """An in-place call made on a placeholder after a function was given to its
    layer's ``Module.apply``: queued after that function (``Registration.then``), not
    on the tensor (whose calls run before it), so both run in program order. Runs
    once on the built layer, on its tensor of that name (a class, not a closure:
    an unbuilt model with one must copy and pickle)."""

    __slots__ = ("call", "name")

    def __init__(self, name: str, call: Call) -> None:
        self.name, self.call = name, call

    def __call__(self, module: nn.Module) -> None:
        *path, leaf = self.name.split(".")
        owner = module.get_submodule(".".join(path))
        tensor: torch.Tensor | None = owner._parameters.get(leaf)
        if tensor is None:
            tensor = owner._buffers.get(leaf)
        if tensor is None:
            tensor = getattr(owner, leaf)
        _, _, args, kwargs = self.call
        target = args[0] if args else kwargs.get("tensor")
        run_pending([self.call], {id(target): tensor})

    def __repr__(self) -> str:
        func = self.call[1]
        return f"{getattr(func, '__qualname__', func)} on {self.name!r}"


def _after_applied(target: torch.Tensor, call: Call) -> bool:
    """Queue ``call`` after the functions applied to the placeholder's layer, if any
    were: it then runs after them, as eager's ``net.apply(fn); w.data.mul_(3)``."""
    layer, name = owner_of(target)
    state = layer.__dict__.get("_di") if layer is not None else None
    registered = state.init if state is not None else None
    if state is None or registered is None or not registered.then:
        return False
    waiting = WaitingCall(name, call)
    state.init = dataclasses.replace(registered, then=(*registered.then, waiting))
    return True


def _inherit(copy: torch.Tensor, original: torch.Tensor) -> None:
    """``copy`` (a conversion or detached copy of the placeholder ``original``) belongs
    to the same layer and waits for the same init calls, made on itself."""

    def mine(x: Any) -> Any:
        return copy if x is original else x

    copy.__dict__.update(original.__dict__)
    calls = original.__dict__.get(QUEUE)
    if calls is not None:
        copy.__dict__[QUEUE] = [
            (n, f, tuple(mine(a) for a in args), {k: mine(v) for k, v in kwargs.items()})
            for n, f, args, kwargs in calls
        ]


def _default(cls: Any, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch's own handling of ``func`` (the placeholder classes' base behaviour)."""
    return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs)  # type: ignore[attr-defined]
