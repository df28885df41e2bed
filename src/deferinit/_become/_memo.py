"""What di.build's shape-only pass learns while placeholders become on meta or
fake tensors: the record of each build (rolled back afterwards) and a memo of
output specs, so equal torch layers on equal inputs run once.

It lives in the becoming stage, below ``_shape``, because the first-forward
build must know whether a shape pass is running (:data:`SHAPE_PASS`).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._declare._deferred import Deferred
from .._declare._layout import freeze
from ._transaction import Transaction

__all__ = ["SHAPE_PASS", "ShapeRecorder", "from_spec", "memo_key", "output_spec"]


class ShapeRecorder:
    """What di.build's shape-only pass learns: ``records`` of (layer, values,
    built_from, undo record or None), rolled back afterwards; and ``memo``, the
    output specs of torch layers already run on meta with the same arguments and
    input specs (a 10,000-layer stack of equal layers runs one of them)."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, dict[str, Any], Any, Transaction | None]] = []
        self.memo: dict[Any, Any] = {}


# Set by di.build while its shape-only pass runs.
SHAPE_PASS: ContextVar[ShapeRecorder | None] = ContextVar("deferinit_shape_pass", default=None)


def memo_key(
    module: Deferred, values: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A key for torch layers on meta inputs, else None (user classes may compute
    shapes from anything, so they always run)."""
    cls = type(module)
    if kwargs or not cls._di_cls.__module__.startswith("torch.nn."):
        return None
    specs = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.device.type != "meta":
            return None
        specs.append((tuple(a.shape), tuple(a.stride()), a.dtype))
    try:
        key = (cls, freeze(module._di.arguments), freeze(values), tuple(specs))
        hash(key)
    except TypeError:
        return None
    return key


def output_spec(output: Any) -> Any:
    leaves, spec = tree_flatten(output)
    kinds = [
        (tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else ("leaf", t)
        for t in leaves
    ]
    if any(k[0] == "leaf" and isinstance(k[1], torch.Tensor) for k in kinds):
        return None
    return spec, kinds


def from_spec(saved: Any) -> Any:
    spec, kinds = saved
    leaves = [
        k[1] if k[0] == "leaf" else torch.empty_strided(k[0], k[1], dtype=k[2], device="meta")
        for k in kinds
    ]
    return tree_unflatten(leaves, spec)
