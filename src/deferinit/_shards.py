"""One rank's slice of a sharded (FSDP2 / tensor-parallel) tensor.

A ``DTensor`` knows its global shape, its device mesh and its placements
(``Shard(0)``, ``Shard(1)``, ``Replicate()``); this rank's local tensor is one
box of the global one. deferinit computes the full single-process value, keeps
that box, and wraps it as the sharded tensor was wrapped.

>>> import torch
>>> box = (slice(0, 2), slice(0, 3))
>>> torch.arange(12.).reshape(4, 3)[box].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = ["local_box", "local_slice", "sharded_like"]


def local_box(sharded: DTensor) -> tuple[slice, ...]:
    """The index of this rank's box in the global tensor."""
    shape, offset = compute_local_shape_and_global_offset(
        sharded.shape, sharded.device_mesh, sharded.placements
    )
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def local_slice(
    sharded: DTensor, full: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """A copy of this rank's box of ``full`` (never a view: a view along dim 0 would
    keep the full tensor alive), in ``dtype`` for floating values if given, else in
    the sharded tensor's dtype."""
    want = dtype if dtype is not None and full.is_floating_point() else sharded.dtype
    return full.detach()[local_box(sharded)].to(device=device, dtype=want, copy=True).contiguous()


def sharded_like(sharded: DTensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` wrapped as ``sharded`` is (mesh, placements, global shape and stride),
    a Parameter if it was one (a new object, as ``load_state_dict(assign=True)``
    makes: FSDP2 re-registers it at its lazy init)."""
    value = DTensor.from_local(
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
