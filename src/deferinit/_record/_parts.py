"""Parts of a recorded model, given to ``di.materialize`` alone.

``di.deferred_init`` marks every submodule of the recorded model with its record and
its name there (``PART_KEY``). The record replays the whole construction in program
order, each draw from the default generator where eager construction makes it, so a
part cannot get eager's values alone: without ``seed=`` it is refused before anything
changes. With ``seed=`` values do not depend on order: the record replays with the
part's tensors named below it (as ``seed=`` names tensors below the module given), and
only those are filled, the part's own init code included.

>>> from torch import nn
>>> from deferinit._record import deferred_init
>>> model = deferred_init(lambda: nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
>>> [name for name, *_ in parts(model[1])], parts(model)
([''], [])
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._declare._recording import RECORD_KEY
from .._tensors import is_meta, tensors_by_name
from ._tape import Record, part_of
from ._twins import declared

__all__ = ["Piece", "part_refused", "parts"]

Piece = tuple[str, nn.Module, Record, set[int]]  # (name, part, record named below it, its finals)


def parts(module: nn.Module) -> list[Piece]:
    """Parts of recorded models below ``module`` whose recorded root is not below it
    and that still wait for values (topmost ones; a deferred layer declared in the
    recording counts, the replay fills it in program order): each with a view of the record
    in which the finals it holds are named below it (``inside``, by index), the others
    under names no tensor of it has, so that ``seed=`` streams go by its names.

    >>> from torch import nn
    >>> from deferinit._record import deferred_init
    >>> model = deferred_init(lambda: nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    >>> [(name, sorted(f.name for f in view.finals)) for name, _, view, _ in parts(model[1])]
    [('', ['<outside>.0.bias', '<outside>.0.weight', 'bias', 'weight'])]
    """
    own = {id(sub.__dict__[RECORD_KEY]) for sub in module.modules() if RECORD_KEY in sub.__dict__}
    found: list[Piece] = []
    for name, sub in module.named_modules():
        part = part_of(sub)
        if part is None or id(part.record) in own:
            continue
        if any(_below(name, prefix) for prefix, _, _, _ in found):
            continue
        record = part.record
        names = {id(t): leaf for leaf, t in _named_tensors(sub)}
        finals, inside = [], set()
        for i, final in enumerate(record.finals):
            below = final.name.startswith(f"{part.name}.")
            leaf = names.get(id(final.placeholder))
            if leaf is None and below and final.kind == "attribute":
                leaf = final.name[len(part.name) + 1 :]
            if leaf is None:
                finals.append(final._replace(name=f"<outside>.{final.name}"))
                continue
            finals.append(final._replace(name=leaf))
            if is_meta(final.placeholder):
                inside.add(i)
        if inside or _twin_waits(sub, record):
            found.append((name, sub, dataclasses.replace(record, finals=finals, plan=None), inside))
    return found


def _twin_waits(sub: nn.Module, record: Record) -> bool:
    """Whether a deferred layer declared in the recording (its placeholders are an
    event of the record, not among its finals) lies below ``sub`` and waits for values."""
    below = {id(m) for m in sub.modules()}
    return any(
        id(layer) in below and any(is_meta(t) for t in tensors_by_name(layer).values())
        for layer in declared(record)
    )


def _below(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(f"{prefix}.")


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]


def part_refused(name: str, sub: nn.Module) -> str:
    """Why a part without ``seed=`` is refused, and what to do."""
    part = part_of(sub)
    assert part is not None
    shown = name or part.name
    there = f" (at {part.name!r} in it)" if name and name != part.name else ""
    return (
        f"di.materialize: {shown!r} ({type(sub).__name__}) is part of a model recorded by "
        f"di.deferred_init{there}, whose values come from replaying the whole "
        f"construction in program order (each draw where eager construction makes it), "
        f"which filling one part cannot do. Nothing was allocated. Fix: "
        f"di.materialize(model) on the recorded model itself, or pass seed= (each tensor "
        f"then draws from its own generator, whatever the order, and this part's own "
        f"init code is replayed)."
    )
