"""Putting new values into a model, undoably: under the existing Python objects, so
that optimizers and every other reference made before see them, or, for FSDP2
shards, as this rank's slice under every name the sharded tensor has. Every step is
logged while :data:`UNDO` holds a list, so that a failing ``di.materialize`` can
put the model back as it was.

The tensor under a Python object is exchanged rather than written (see
:mod:`deferinit._swap`), so the object keeps its identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .._declare._pending import convert_through, dtypes_passed
from .._errors import DeferredInitError
from .._shards import is_dtensor, local_slice, sharded_like
from .._swap import exchange, wraps
from .._tensors import is_meta, own_tensors, table_of
from ._hugepages import advise

__all__ = [
    "UNDO",
    "Owners",
    "Undo",
    "Slot",
    "local_part",
    "place_attribute",
    "place_by_name",
    "place_under_object",
    "sharded_owners",
]

# One undo step: puts one tensor back; returns ``None``, or, where the tensor could
# be put back only under a new object, a sentence saying which and why.
Undo = Callable[[], str | None]

# What to do, newest first, to put every tensor materialize replaced back.
UNDO: ContextVar[list[Undo] | None] = ContextVar("UNDO", default=None)


def on_undo(action: Undo) -> None:
    log = UNDO.get()
    if log is not None:
        log.append(action)


# Every (module, leaf) holding a sharded tensor, by the tensor's id: a tied sharded
# tensor is replaced (not swapped) when filled, under each of its names at once.
Owners = dict[int, list[tuple[nn.Module, str]]]


def sharded_owners(root: nn.Module) -> Owners:
    owners: Owners = {}
    for sub in root.modules():
        for leaf, t in own_tensors(sub).items():
            if is_dtensor(t) and is_meta(t):
                owners.setdefault(id(t), []).append((sub, leaf))
    return owners


def _tensor_kind(t: torch.Tensor) -> str:
    return "parameter" if isinstance(t, nn.Parameter) else "buffer"


def place_under_object(
    owner: nn.Module,
    old: torch.Tensor,
    new: torch.Tensor,
    dtype: torch.dtype | None,
    qualified: str,
) -> None:
    """Put ``new``'s values under the ``old`` Python object, so that optimizers and
    every other reference made before materialization see them. ``qualified`` names
    the tensor in errors. Never a new object: where the swap is unsound, a
    :class:`DeferredInitError` saying why, and the model is put back."""
    passed = dtypes_passed(old)
    if passed:  # converted before its build on meta (.half().float()): rounded as eager's
        new = convert_through(new.detach(), passed)
    want = dtype if dtype is not None and new.is_floating_point() else old.dtype
    data = new.detach().to(dtype=want) if new.dtype != want else new.detach()
    data.requires_grad_(old.requires_grad)
    if wraps(old) and isinstance(old, nn.Parameter):  # its class goes with the swap
        data = nn.Parameter(data, requires_grad=old.requires_grad)
    why = exchange(old, data)
    if why is not None:
        raise DeferredInitError(
            f"di.materialize: {_tensor_kind(old)} {qualified!r} of {type(owner).__name__} "
            f"cannot be filled under its own object: {why}. deferinit never hands out a new "
            f"object in its place (an optimizer made before would silently stop training "
            f"it). The model is left as it was. Fix: drop those references (del them) and "
            f"call di.materialize again."
        )
    on_undo(functools.partial(_swap_back, owner, old, data, qualified))


def _swap_back(
    owner: nn.Module, old: torch.Tensor, data: torch.Tensor, qualified: str
) -> str | None:
    """Undo a :func:`place_under_object`. Where something made during
    materialization still holds the new data, the meta tensor goes back into the
    table under ``data``'s object: the state is restored, the identity is not, and
    the caller reports it."""
    why = exchange(old, data)
    if why is None:
        return None
    tables: tuple[dict[str, Any], ...] = (owner._parameters, owner._buffers)
    for table in tables:
        for key, value in table.items():
            if value is old:  # under every name it has in this module (ties)
                table[key] = data
    return f"{_tensor_kind(old)} {qualified!r} ({why})"


# Where a plain tensor attribute is held: the mapping (a module's ``__dict__``, or a
# dict held there) or list, and its key there; ``None`` inside a tuple.
Slot = tuple[dict[Any, Any] | list[Any], Any] | None


def place_attribute(
    owner: nn.Module, old: torch.Tensor, new: torch.Tensor, slot: Slot, qualified: str
) -> None:
    """Put ``new``'s values under ``old``, a plain tensor attribute (neither parameter
    nor buffer) of ``owner``'s, held at ``slot``: its own object keeps every reference
    to it. Its dtype stays the constructed one, as ``module.to(dtype)`` leaves such
    tensors alone. ``qualified`` names it in errors."""
    data = new.detach()
    data.requires_grad_(old.requires_grad)
    why = exchange(old, data)
    if why is not None:
        raise DeferredInitError(
            f"di.materialize: tensor attribute {qualified!r} of {type(owner).__name__} "
            f"cannot be filled under its own object: {why}. deferinit never hands out a new "
            f"object in its place (a reference made before would silently keep the meta "
            f"one). The model is left as it was. Fix: drop those references (del them) and "
            f"call di.materialize again."
        )
    on_undo(functools.partial(_attribute_back, old, data, slot, qualified))


def _attribute_back(
    old: torch.Tensor, data: torch.Tensor, slot: Slot, qualified: str
) -> str | None:
    """Undo a :func:`place_attribute`; where something made meanwhile still holds the
    new data, the meta tensor goes back at ``slot`` under ``data``'s object, and the
    caller reports it (as :func:`_swap_back` does for parameters and buffers)."""
    why = exchange(old, data)
    if why is None:
        return None
    if slot is None:
        return f"tensor attribute {qualified!r}, held in a tuple, keeps its new values ({why})"
    holder, key = slot
    if holder[key] is old:
        holder[key] = data
    return f"tensor attribute {qualified!r} ({why})"


def _replace_under_names(places: list[tuple[nn.Module, str]], fresh: torch.Tensor) -> None:
    """``fresh`` under each (module, name), undoably."""
    for owner, leaf in places:
        table = table_of(owner, leaf)
        before = table[leaf]
        table[leaf] = fresh
        on_undo(functools.partial(_put_back, table, leaf, before))


def _put_back(table: dict[str, Any], leaf: str, before: torch.Tensor) -> None:
    table[leaf] = before


def local_part(
    old: torch.Tensor, full: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """What this rank keeps of ``full``, the single-process value of the tensor ``old``:
    for a sharded (DTensor) tensor a copy of its own slice, on ``device`` and in the
    dtype it will have; any other tensor's value is kept whole, as it is.

    >>> import torch
    >>> full = torch.arange(4.0)
    >>> local_part(torch.empty(4), full, torch.device("cpu"), None) is full
    True
    """
    if not is_dtensor(old):
        return full
    return local_slice(old, full, device, dtype, advise)  # type: ignore[arg-type]


def place_by_name(
    layer: nn.Module,
    name: str,
    old: torch.Tensor,
    value: torch.Tensor,
    dtype: torch.dtype | None,
    owners: Owners,
    prefix: str,
) -> None:
    """``value`` into the tensor ``name`` of ``layer`` (which sits at ``prefix``):
    under its own object (:func:`place_under_object`), or, for a sharded tensor,
    where ``value`` is this rank's :func:`local_part`, as a new sharded tensor under
    every name it has (:func:`_place_shard`)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(owner_name)
    if is_dtensor(old):
        places = owners.get(id(old), [(owner, leaf)])
        if is_meta(old):  # a tied tensor is filled once, under its first name
            _place_shard(places, old, value)
    else:
        place_under_object(owner, old, value, dtype, f"{prefix}.{name}" if prefix else name)


def _place_shard(
    places: list[tuple[nn.Module, str]], sharded: torch.Tensor, local: torch.Tensor
) -> None:
    """A sharded (FSDP2 / DTensor) tensor: this rank's ``local`` slice of the
    single-process value becomes a sharded tensor under every name the tensor has:
    a new parameter object, as load_state_dict(assign=True) makes (FSDP2 re-pads and
    re-registers it at its lazy init; create optimizers after materializing)."""
    _replace_under_names(places, sharded_like(sharded, local))  # type: ignore[arg-type]
