"""The undo record of one build: everything :func:`~._become.become` changes
(class, ``__dict__``, hook tables, the placeholders' data and class), put back
by :meth:`Transaction.rollback` after any failure, Ctrl-C included."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._naming import label
from .._swap import exchange_or_raise

__all__ = ["HOOK_TABLES", "Transaction", "hook_tables"]


# The hook tables every Module has (forward, pre-forward, backward, state-dict ...).
HOOK_TABLES = tuple(
    k for k, v in nn.Module().__dict__.items() if isinstance(v, dict) and "hooks" in k
)


def hook_tables(d: Mapping[str, Any]) -> list[str]:
    return [k for k in HOOK_TABLES if k in d]


class Transaction:
    """Undo record of one :func:`become`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.dict = module.__dict__
        d = module.__dict__
        self.hooks = (
            {k: list(d[k].items()) for k in HOOK_TABLES if d.get(k)}
            if any(map(d.get, HOOK_TABLES))
            else {}
        )
        self.tensors: list[tuple[torch.Tensor, type, torch.Tensor]] = []
        self.swaps: list[tuple[torch.Tensor, type, torch.Tensor]] = []
        # What the placeholders' __dict__ gave up (waiting init calls, owner note).
        self.notes: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def rollback(self) -> None:
        # Class first: a thread that looks now waits on the build lock.
        object.__setattr__(self.module, "__class__", self.cls)
        object.__setattr__(self.module, "__dict__", self.dict)
        for key, items in self.hooks.items():
            table = self.dict[key]
            table.clear()
            table.update(items)
        for tensor, cls, data in self.tensors:
            tensor.data = data
            tensor.__class__ = cls
        for a, cls, b in reversed(self.swaps):
            # Refused only while a failed forward's graph is still alive: raising then
            # beats going on with a half rolled-back model.
            exchange_or_raise(
                a,
                b,
                f"undoing the build of {label(self.module)}: a placeholder",
                "drop those references; the layer cannot be used until then.",
            )
            a.__class__ = cls
        for tensor, removed in self.notes:
            tensor.__dict__.update(removed)
