"""The commit of ``di.load_state_dict``: every new tensor made first
(:func:`prepare`, allocation may fail), then written with an undo step each
(:func:`commit`), so any exception, ``KeyboardInterrupt`` included, restores
the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._naming import label
from .._swap import exchange_or_raise
from .._tensors import kind_of
from ._sizes import swappable

__all__ = ["Write", "commit", "prepare"]


@dataclass
class Write:
    """One tensor of the model and what it takes."""

    owner: nn.Module
    target: torch.Tensor
    key: str
    value: torch.Tensor
    fresh: torch.Tensor | None = None  # for a swap: the new tensor, prepared before commit


def prepare(
    writes: list[Write], devices: dict[int, torch.device], *, owned: bool, assign: bool
) -> None:
    """Make every new tensor before the model is touched (allocation may fail)."""
    taken: set[int] = set()  # storages of file tensors already taken

    def own(value: torch.Tensor) -> bool:
        # A torch file keeps ties by storage: two keys over one storage get two copies.
        if not owned or value.untyped_storage().data_ptr() in taken:
            return False
        taken.add(value.untyped_storage().data_ptr())
        return True

    with torch.no_grad():
        for w in writes:
            target, value = w.target, w.value
            if assign:
                new = value.detach()
            elif is_lazy(target):  # a torch Lazy module's: the saved shape, its dtype and device
                if (
                    (value.dtype, value.device) == (target.dtype, target.device)
                    and value.is_contiguous()
                    and value.storage_offset() == 0
                    and own(value)
                ):
                    new = value.detach()
                else:
                    new = torch.empty(value.shape, dtype=target.dtype, device=target.device)
                    new.copy_(value)
            elif target.device.type != "meta":
                if not (_fits(value, target, target.device) and _alone(target) and own(value)):
                    continue  # copied into at commit, in place
                new = value.detach()  # the file's tensor replaces a storage no one shares
            else:
                device = devices.get(id(target), value.device)
                if device.type == "meta":
                    device = value.device
                if _fits(value, target, device) and own(value):
                    new = value.detach()  # the file's own tensor: no second copy
                else:
                    new = torch.empty_strided(
                        target.shape, target.stride(), dtype=target.dtype, device=device
                    )
                    new.copy_(value)
            w.fresh = (
                nn.Parameter(new, requires_grad=target.requires_grad)
                if isinstance(target, nn.Parameter)
                else new.requires_grad_(target.requires_grad)
                if new.is_floating_point() or new.is_complex()
                else new
            )


def _fits(value: torch.Tensor, target: torch.Tensor, device: torch.device) -> bool:
    """Whether ``value`` can become ``target`` as it is (a file's tensor, unconverted)."""
    return (
        value.dtype == target.dtype
        and value.device == device
        and value.stride() == target.stride()
        and value.storage_offset() == 0
    )


def _alone(target: torch.Tensor) -> bool:
    """Whether ``target`` is the only tensor over its storage (no views, no ties by
    storage, nothing saved for backward): then a new storage under it is the same
    as writing into the old one, and the old values need no copy for the undo."""
    # One reference is the temporary storage object made to ask.
    count: int = torch._C._storage_Use_Count(target.untyped_storage()._cdata)
    return count == 2


def commit(writes: list[Write], extra: list[tuple[nn.Module, Any]]) -> None:
    undo: list[Callable[[], None]] = []
    swapped: set[int] = set()
    # The last key wins for a tensor the model holds under two keys, as torch's copies.
    last = {id(w.target): w for w in writes if w.fresh is not None}
    owners = [w.owner for w in writes if w.fresh is not None]
    try:
        with swappable(owners), torch.no_grad():
            for w in writes:
                if w.fresh is None:
                    backup = w.target.detach().clone()
                    undo.append(_restore(w.target, backup))
                    w.target.copy_(w.value)
                elif last[id(w.target)] is w and id(w.target) not in swapped:
                    undo.append(_swap_in(w))
                    swapped.add(id(w.target))
            # Last: extra state cannot be undone (what set_extra_state did before
            # it raised stays), the tensors before it can.
            for owner, value in extra:
                owner.set_extra_state(value)
    except BaseException:
        with swappable(owners), torch.no_grad():
            for step in reversed(undo):
                step()
        raise


def _restore(target: torch.Tensor, backup: torch.Tensor) -> Callable[[], None]:
    def undo() -> None:
        target.copy_(backup)

    return undo


def _swap_in(w: Write) -> Callable[[], None]:
    """``w.fresh``'s data under ``w.target``'s object (which keeps its identity, class,
    attributes, hooks and weak references); returns the undo."""
    assert w.fresh is not None
    target, fresh = w.target, w.fresh
    exchange_or_raise(
        target,
        fresh,
        # Worded only if refused: naming a layer walks the model, once per tensor here.
        lambda: f"di.load_state_dict: {kind_of(target)} {w.key!r} of {label(w.owner)}",
        "drop those references (del them) and load again. The model is left as it was.",
    )
    cls = type(target)
    if is_lazy(target):  # a torch Lazy module's placeholder becomes what it stands for
        target.__class__ = target.cls_to_become  # type: ignore[union-attr]

    def undo() -> None:
        # Nothing made since holds the loaded data (no forward ran in between), so
        # this cannot be refused; if it were, raising beats a half-undone model.
        exchange_or_raise(target, fresh, "undoing di.load_state_dict: a tensor", "reload it.")
        target.__class__ = cls

    return undo
