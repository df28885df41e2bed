"""``seed=``: each tensor's random numbers from its own generator, derived from the
seed and its qualified name, so its values do not depend on the order or on the
rest of the model (what ``di.materialize(seed=...)`` promises today).

A random operation draws from the generator of the final tensor it feeds: the one
whose storage it writes, or, for an intermediate (``torch.randn`` later copied into
a weight), the final tensor that the intermediate flows into first. A draw that
feeds no final tensor uses a generator named ``"<unused>"``. Ops on one tensor draw
from its generator in program order, so a tensor's values depend only on the seed,
its name and the operations applied to it.

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init, replay_recorded
>>> def one() -> nn.Module:
...     return nn.Sequential(nn.Linear(3, 4))
>>> def two() -> nn.Module:
...     return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
>>> a = replay_recorded(deferred_init(one), seed=7)
>>> b = replay_recorded(deferred_init(two), seed=7)
>>> torch.equal(a[0].weight, b[0].weight)
True
"""

from __future__ import annotations

import hashlib

from ._tape import Record

__all__ = ["draw_owners", "seed_of"]

UNUSED = "<unused>"


def seed_of(seed: int, qualified: str) -> int:
    """The generator seed of the tensor at ``qualified`` (as deferinit derives it)."""
    digest = hashlib.sha256(f"{seed}:{qualified}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_owners(record: Record, prefix: str) -> dict[int, str]:
    """For each random operation (by index), the qualified name of the final tensor
    whose generator it draws from."""
    owner: dict[int, str] = {}  # storage -> name of the final tensor it feeds
    for final in record.finals:
        owner.setdefault(final.ref.storage, f"{prefix}{final.name}")
    draws: dict[int, str] = {}
    for index in range(len(record.ops) - 1, -1, -1):
        op = record.ops[index]
        made = op.writes | {sid for sid, _ in op.creates}
        names = sorted({owner[s] for s in made if s in owner})
        name = names[0] if names else None
        if op.random:
            draws[index] = name or UNUSED
        if name is not None:
            for sid in op.reads | made:
                owner.setdefault(sid, name)
    return draws
