"""Exchanging the C++ tensors under two Python tensor objects, each object keeping
its identity, class, attributes, gradient hooks and weak references: the one way
deferinit gives a tensor new data where writing into it cannot (a meta tensor
cannot take real data in place: ``param.data = cpu_tensor`` raises "incompatible
tensor type", ``param.set_(cpu_tensor)`` refuses a storage on another device).

This uses ``torch._C._swap_tensor_impl``, the core of ``torch.utils.swap_tensors``,
rather than that function, for two reasons. ``swap_tensors`` refuses any tensor
with a Python weak reference (a user's ``weakref.ref``, ``weakref.finalize``, a
``WeakKeyDictionary`` key, an RNN's ``_flat_weight_refs``), because a weak
reference sees new contents behind the same object; here that is the point:
whoever refers to the parameter, strongly or weakly, must see it filled. And it
also swaps the Python class and attributes, which would move attributes a user set
on the parameter to the discarded object. What must hold for the swap to be sound
is kept: no other C++ reference to either tensor (a view, an autograd graph),
since torch keeps a Python object alive from the C++ side by counting those
references, and no C++ weak reference (checked by torch itself).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from ._errors import DeferredInitError

__all__ = ["HELD", "alone", "exchange", "exchange_or_raise", "wraps"]

HELD = (
    "another tensor holds its data: a view of it (such as p[0] or p.view(-1)) or an "
    "autograd graph that used it (the output of a forward run on meta) is still alive"
)


def alone(*tensors: torch.Tensor) -> bool:
    """Whether no other C++ reference holds any of ``tensors`` (the count
    ``torch.utils.swap_tensors`` checks too)."""
    return all(t._use_count() == 1 for t in tensors)  # type: ignore[attr-defined]


def wraps(t: torch.Tensor) -> bool:
    """Whether ``t`` is a Python wrapper subclass (its data lives in Python attributes)."""
    return bool(torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python))


def exchange(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Swap the C++ tensors under the Python objects ``a`` and ``b``, each object
    keeping its class, attributes, gradient hooks and weak references; or, leaving
    both as they were, say why that is unsound."""
    if not alone(a, b):
        gc.collect()  # a view or graph that is garbage already must not block it
        if not alone(a, b):
            return HELD
    try:
        if wraps(a) or wraps(b):
            # A subclass that keeps its data in Python attributes (a wrapper, such as
            # a quantized tensor) is only whole with them: torch's full swap.
            torch.utils.swap_tensors(a, b)
        else:
            torch._C._swap_tensor_impl(a, b)
    except RuntimeError as error:  # a C++ weak reference; for wrappers, any weak one
        return f"torch refuses to swap it ({error})"
    for t in (a, b):
        # Gradient hooks are kept on the Python object but take effect through the
        # C++ tensor: without this, hooks registered before would never fire.
        for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            held = getattr(t, hooks)
            if held is not None:
                setattr(t, hooks, held)
    return None


def exchange_or_raise(
    a: torch.Tensor, b: torch.Tensor, what: str | Callable[[], str], fix: str
) -> None:
    """:func:`exchange`, raising a :class:`DeferredInitError` where it is unsound.
    ``what`` names the tensor and the step (``"di.load_state_dict: parameter 'fc.weight'
    of Linear"``), or makes that text only when needed (naming a layer walks the model:
    doing it for every swap made large builds quadratic); ``fix`` says how to get past it."""
    why = exchange(a, b)
    if why is not None:
        if callable(what):
            what = what()
        raise DeferredInitError(
            f"{what} cannot be given its new data under its own object: {why}. deferinit "
            f"never hands out a new object in its place (an optimizer or any other "
            f"reference made before would silently keep the old one). Fix: {fix}"
        )
