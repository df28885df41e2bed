"""One rank's slice of a sharded (FSDP2 / tensor-parallel) tensor.

A ``DTensor`` knows its global shape, its device mesh and its placements
(``Shard(0)``, ``Shard(1)``, ``Replicate()``); this rank's local tensor is one
box of the global one. deferinit computes the full single-process value, keeps
that box, and wraps it as the sharded tensor was wrapped.

The DTensor stack (``torch.distributed.tensor``, which pulls in sympy and
torch.fx's symbolic shapes: about 0.6 s) is never imported by ``import
deferinit``: a DTensor exists only once the user imported it (``fully_shard``,
``parallelize_module``), so :func:`is_dtensor` asks ``sys.modules``, and the
functions that work on a DTensor take its module from there.

>>> import torch
>>> is_dtensor(torch.zeros(2))
False
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
else:
    DTensor = Any

__all__ = ["is_dtensor", "local_box", "local_slice", "sharded_like"]

_STACK = "torch.distributed.tensor"


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (without importing the DTensor stack)."""
    stack = sys.modules.get(_STACK)
    return stack is not None and isinstance(t, stack.DTensor)


def _stack(name: str = _STACK) -> ModuleType:
    # Already imported wherever a DTensor exists; importlib only finds it.
    return importlib.import_module(name)


def local_box(sharded: DTensor) -> tuple[slice, ...]:
    """The index of this rank's box in the global tensor."""
    utils = _stack(f"{_STACK}._utils")
    shape, offset = utils.compute_local_shape_and_global_offset(
        sharded.shape, sharded.device_mesh, sharded.placements
    )
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def local_slice(
    sharded: DTensor,
    full: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    advise: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """A copy of this rank's box of ``full`` (never a view: a view along dim 0 would
    keep the full tensor alive), in ``dtype`` for floating values if given, else in
    the sharded tensor's dtype. ``advise`` sees the copy's memory before it is
    written (huge pages: ``deferinit._fill._hugepages.advise``)."""
    want = dtype if dtype is not None and full.is_floating_point() else sharded.dtype
    box = full.detach()[local_box(sharded)]
    kept = torch.empty(box.shape, dtype=want, device=device)
    if advise is not None:
        advise(kept)
    return kept.copy_(box)


def sharded_like(sharded: DTensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` wrapped as ``sharded`` is (mesh, placements, global shape and stride),
    a Parameter if it was one (a new object, as ``load_state_dict(assign=True)``
    makes: FSDP2 re-pads and re-registers it at its lazy init)."""
    value: torch.Tensor = _stack().DTensor.from_local(
        local,
        sharded.device_mesh,
        sharded.placements,
        run_check=False,
        shape=sharded.shape,
        stride=sharded.stride(),
    )
    if isinstance(sharded, nn.Parameter):
        return nn.Parameter(value, requires_grad=sharded.requires_grad)
    return value
