"""Putting new values into a model, undoably: under the existing Python objects
(``torch.utils.swap_tensors``, so optimizers made before keep them), or, for FSDP2
shards, as this rank's slice under every name the sharded tensor has. Every step is
logged while :data:`UNDO` holds a list, so that a failing ``di.materialize`` can
put the model back as it was.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = ["UNDO", "Owners", "direct", "is_meta", "named", "place", "put", "sharded_owners"]


# What to do, newest first, to put every tensor materialize replaced back.
UNDO: ContextVar[list[Callable[[], None]] | None] = ContextVar("UNDO", default=None)


def on_undo(action: Callable[[], None]) -> None:
    log = UNDO.get()
    if log is not None:
        log.append(action)


def direct(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = [(n, p) for n, p in module._parameters.items() if p is not None]
    return out + [(n, b) for n, b in module._buffers.items() if b is not None]


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


# Every (module, leaf) holding a sharded tensor, by the tensor's id: a tied sharded
# tensor is replaced (not swapped) when filled, under each of its names at once.
Owners = dict[int, list[tuple[nn.Module, str]]]


def sharded_owners(root: nn.Module) -> Owners:
    owners: Owners = {}
    for sub in root.modules():
        for leaf, t in direct(sub):
            if isinstance(t, DTensor) and is_meta(t):
                owners.setdefault(id(t), []).append((sub, leaf))
    return owners


def named(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(), *module.named_buffers()])


def place(
    owner: nn.Module, leaf: str, old: torch.Tensor, new: torch.Tensor, dtype: torch.dtype | None
) -> None:
    """Put ``new``'s values under the ``old`` Python object, so that optimizers and
    other references made before materialization see them."""
    want = dtype if dtype is not None and new.is_floating_point() else old.dtype
    data = new.detach().to(dtype=want) if new.dtype != want else new.detach()
    fresh: torch.Tensor
    if isinstance(old, nn.Parameter):
        fresh = nn.Parameter(data, requires_grad=old.requires_grad)
    else:
        fresh = data
    for attempt in range(2):
        try:
            torch.utils.swap_tensors(old, fresh)
        except RuntimeError:
            # A weak reference blocks the swap (e.g. a finished fake-tensor pass
            # that is not collected yet): collect once and retry.
            if attempt == 0:
                gc.collect()
            continue
        on_undo(functools.partial(_swap_back, owner, leaf, old, fresh))
        return
    _replace([(owner, leaf)], fresh)  # last resort: identity is lost


def _swap_back(owner: nn.Module, leaf: str, old: torch.Tensor, fresh: torch.Tensor) -> None:
    """Undo a swap; where a live view or weak reference blocks it, put the meta tensor
    (now under ``fresh``) back in the table instead: identity is lost, not the state."""
    try:
        torch.utils.swap_tensors(old, fresh)
    except RuntimeError:
        table: dict[str, Any] = owner._parameters if leaf in owner._parameters else owner._buffers
        table[leaf] = fresh


def _replace(places: list[tuple[nn.Module, str]], fresh: torch.Tensor) -> None:
    """``fresh`` under each (module, name), undoably."""
    for owner, leaf in places:
        table: dict[str, Any] = owner._parameters if leaf in owner._parameters else owner._buffers
        before = table[leaf]
        table[leaf] = fresh
        on_undo(functools.partial(table.__setitem__, leaf, before))


def put(
    layer: nn.Module,
    name: str,
    old: torch.Tensor,
    value: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
    owners: Owners,
) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(owner_name)
    if isinstance(old, DTensor):
        places = owners.get(id(old), [(owner, leaf)])
        if is_meta(old):  # a tied tensor is filled once, under its first name
            _fill_shard(places, old, value, device, dtype)
    else:
        place(owner, leaf, old, value, dtype)


def _fill_shard(
    places: list[tuple[nn.Module, str]],
    sharded: DTensor,
    full: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """A sharded (FSDP2 / DTensor) tensor: this rank keeps only its own shard, a
    copy of the matching slice of the single-process value, under every name the
    tensor has."""
    shape, offset = compute_local_shape_and_global_offset(
        sharded.shape, sharded.device_mesh, sharded.placements
    )
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    want = dtype if dtype is not None and full.is_floating_point() else sharded.dtype
    # copy=True: a slice along dim 0 is a view, which would keep the full tensor alive.
    local = full.detach()[index].to(device=device, dtype=want, copy=True).contiguous()
    value = DTensor.from_local(
        local,
        sharded.device_mesh,
        sharded.placements,
        run_check=False,
        shape=sharded.shape,
        stride=sharded.stride(),
    )
    # A new parameter object, as load_state_dict(assign=True) makes: FSDP2 re-pads
    # and re-registers it at its lazy init. Create optimizers after materializing.
    fresh: torch.Tensor = value
    if isinstance(sharded, nn.Parameter):
        fresh = nn.Parameter(value, requires_grad=sharded.requires_grad)
    _replace(places, fresh)
