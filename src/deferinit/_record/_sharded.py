"""Recorded models sharded with FSDP2 or tensor parallelism: each rank keeps its slice.

``fully_shard`` and ``parallelize_module`` replace a recorded model's meta
placeholders with sharded ``DTensor`` parameters (new objects, on meta). The
replay finds them by the name each recorded tensor had, computes the full
single-process value in program order, keeps only this rank's box of it as soon
as it is complete, and frees the full tensor once nothing later reads it: each
rank allocates its shards plus about one full tensor at a time.

>>> from torch import nn
>>> from deferinit._record import deferred_init
>>> model = deferred_init(nn.Linear, 2, 3)
>>> [type(t).__name__ for t in targets(model, model._di_record)]
['Normal', 'Normal']
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .._shards import is_dtensor, local_slice, sharded_like
from .._tensors import is_meta
from ._tape import Final, Record

if TYPE_CHECKING:  # the DTensor stack loads only where a DTensor exists (see _shards)
    from torch.distributed.tensor import DTensor

__all__ = ["Normal", "Sharded", "Target", "holders", "place_sharded", "targets"]


class Normal(NamedTuple):
    """The placeholder itself is still in the model, on meta: swap the value under it."""

    placeholder: torch.Tensor


class Sharded(NamedTuple):
    """A sharded tensor took the placeholder's place: keep this rank's slice, put it
    under every (module, leaf) holding that tensor."""

    current: DTensor
    places: list[tuple[nn.Module, str]]

    def keep(self, device: torch.device, dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
        return functools.partial(local_slice, self.current, device=device, dtype=dtype)


Target = Normal | Sharded | None  # None: holds values already, nothing to fill


def holders(owner: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in owner.modules():
        for table in (sub._parameters, sub._buffers):
            for leaf, t in table.items():
                if t is not None:
                    found.setdefault(id(t), []).append((sub, leaf))
    return found


def _at(owner: nn.Module, name: str) -> torch.Tensor | None:
    path, _, leaf = name.rpartition(".")
    try:
        sub = owner.get_submodule(path)
    except AttributeError:
        return None
    found: torch.Tensor | None = sub._parameters.get(leaf, sub._buffers.get(leaf))
    return found


def _target(final: Final, owner: nn.Module, holders: dict[int, Any]) -> Target:
    placeholder = final.placeholder
    if final.kind == "attribute" or id(placeholder) in holders:
        return Normal(placeholder) if is_meta(placeholder) else None
    current = _at(owner, final.name)
    if is_dtensor(current) and is_meta(current):
        return Sharded(current, holders[id(current)])
    if current is None:  # moved out of the tables: the object may live on elsewhere
        return Normal(placeholder) if is_meta(placeholder) else None
    return None  # replaced by a tensor that holds values


def targets(owner: nn.Module, record: Record) -> list[Target]:
    """For each final tensor of ``record`` (kept on ``owner``), where its value goes."""
    found = holders(owner)
    return [_target(final, owner, found) for final in record.finals]


def place_sharded(target: Sharded, local: torch.Tensor, undo: list[Callable[[], None]]) -> None:
    """This rank's slice, wrapped as the sharded tensor, under each of its names."""
    fresh = sharded_like(target.current, local)
    for module, leaf in target.places:
        table: dict[str, Any] = (
            module._parameters if leaf in module._parameters else module._buffers
        )
        undo.append(functools.partial(table.__setitem__, leaf, table[leaf]))
        table[leaf] = fresh
