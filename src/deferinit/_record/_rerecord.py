"""Recording a construction again from the generator state at ``materialize``.

A value read steered by random numbers (a *guard*: ``nn.init.trunc_normal_``'s
rejection loop ``if not mask.any()``) was answered at record time by simulating the
draws from the state at ``deferred_init``. Eager construction starts from the state
at ``materialize``; when that differs, the path the record followed may not be
eager's. So the factory is recorded again from the state at ``materialize`` (which
draws nothing), and that record replays under the placeholders the user holds,
provided the new run built the same model: the same tensors (names, kinds, shapes,
strides, dtypes, ties) and the same plain Python values (``python_state``). If it
did not, eager construction takes another path than the model the user holds: a
:class:`ReplayError` before anything is drawn.

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init, replay_recorded
>>> def truncated() -> nn.Module:
...     layer = nn.Linear(16, 16)
...     nn.init.trunc_normal_(layer.weight)
...     return layer
>>> _ = torch.manual_seed(0)
>>> eager = truncated()
>>> _ = torch.manual_seed(5)
>>> model = deferred_init(truncated)
>>> _ = torch.manual_seed(0)
>>> torch.equal(replay_recorded(model).weight, eager.weight)
True
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._deferred_init import record_construction, recording
from ._engine import same
from ._errors import ReplayError
from ._placeholders import python_state
from ._tape import Applied, Declared, Final, Op, Queued, Record, Reseed

__all__ = ["current"]


def current(record: Record, device: torch.device) -> Record:
    """The record to replay now, without ``seed=``, on ``device``: ``record`` where its
    guards were simulated from the state the default generator has now (or cannot be
    recorded again: then the replay checks each guard), else a new recording."""
    twins = record.events()
    if (
        not record.guarded
        or record.rerun is None
        or record.start_state is None  # recorded on another device than the CPU
        or device != record.default_device
        or torch.get_default_device() != record.default_device
        or recording()
        # Deferred layers declared in it draw at replay, but the guards were simulated
        # without them (sizes unknown then): recorded again with their sizes.
        or (not twins and torch.equal(torch.get_rng_state(), record.start_state))
    ):
        return record
    factory, args, kwargs = record.rerun
    reseeds = any(isinstance(op.event, Reseed) for op in record.ops)
    with warnings.catch_warnings(), _untouched(cpu=reseeds):
        warnings.simplefilter("ignore")  # shown once already, at deferred_init
        module, fresh = record_construction(factory, args, kwargs, twins)
    difference = _difference(record, fresh, python_state(module))
    if difference is None:
        difference = _other_events(twins, fresh.events())
    if difference is not None:
        raise ReplayError(_another_path(record, fresh, difference))
    fresh.finals = [
        new._replace(placeholder=old.placeholder)
        for old, new in zip(record.finals, fresh.finals, strict=True)
    ]
    # The layers the user holds (built) replay at the new run's places.
    given = iter(twins)
    fresh.ops = [
        op._replace(event=next(given)) if isinstance(op.event, Declared | Queued | Applied) else op
        for op in fresh.ops
    ]
    fresh.plan = None
    fresh.make_plan()
    return fresh


def _other_events(
    old: list[Declared | Queued | Applied], new: list[Declared | Queued | Applied]
) -> str | None:
    """How the deferred layers declared (and init calls queued) differ, or ``None``."""
    if len(old) != len(new):
        return f"it declares {len(new)} deferred layers and init calls, the model {len(old)}"
    for a, b in zip(old, new, strict=True):
        if type(a) is not type(b) or (isinstance(a, Queued) and a.leaf != b.leaf):  # type: ignore[union-attr]
            return f"it declares {b} where the model has {a}"
    return None


@contextlib.contextmanager
def _untouched(*, cpu: bool) -> Iterator[None]:
    """The generators as they were before, where the factory sets them (``torch.manual_seed``
    in its ``__init__``): the replay makes that reseed at its place, this extra run of
    the factory must leave no trace (it draws nothing itself). The CPU generator is put
    back only for a factory that the first recording saw reseed it (``cpu``): any other
    change is another thread's draw, which putting it back would undo (DESIGN §3.6)."""
    saved = torch.get_rng_state() if cpu else None
    python = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        if saved is not None and not torch.equal(torch.get_rng_state(), saved):
            torch.set_rng_state(saved)
        if random.getstate() != python:
            random.setstate(python)
        if cuda is not None:
            now = torch.cuda.get_rng_state_all()
            if any(not torch.equal(a, b) for a, b in zip(cuda, now, strict=True)):
                torch.cuda.set_rng_state_all(cuda)


def _difference(old: Record, new: Record, state: Any) -> str | None:
    """How the model ``new`` recorded differs from the one ``old`` did, or ``None``."""
    if len(old.finals) != len(new.finals):
        return f"it holds {len(new.finals)} tensors, the model {len(old.finals)}"
    storages: dict[int, int] = {}
    for a, b in zip(old.finals, new.finals, strict=True):
        if _describe(a) != _describe(b) or storages.setdefault(a.ref.storage, b.ref.storage) != (
            b.ref.storage
        ):
            return f"its tensor {b.name!r} is {_describe(b)}, the model's {_describe(a)}"
    for (name, cls, attrs), (old_name, old_cls, old_attrs) in zip(
        state, old.fingerprint, strict=False
    ):
        where = f"{name or '<root>'} ({cls})"
        if (name, cls) != (old_name, old_cls):
            return f"it builds {where} where the model has {old_name or '<root>'} ({old_cls})"
        theirs, ours = dict(attrs), dict(old_attrs)
        if theirs != ours:  # in any order: a deferred layer sets its own late
            key = next(k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k))
            return (
                f"attribute {key!r} of {where} would be {theirs.get(key)!r}, the model "
                f"has {ours.get(key)!r}"
            )
    if len(state) != len(old.fingerprint):
        return f"it builds {len(state)} modules, the model {len(old.fingerprint)}"
    return None


def _describe(final: Final) -> tuple[Any, ...]:
    ref = final.ref
    return (final.name, final.kind, ref.shape, ref.stride, ref.offset, ref.dtype)


def _another_path(old: Record, new: Record, difference: str) -> str:
    """The message: the first value read that came out otherwise, and what differs."""
    before = [op for op in old.ops if op.guard is not None]
    after = [op for op in new.ops if op.guard is not None]
    first: Op = before[0]
    value: Any = "not read"
    for index, op in enumerate(before):
        first = op
        value = after[index].guard[0] if index < len(after) else "not read"
        if index >= len(after) or not same(op.guard[0], value):
            break
    expected, where = first.guard
    return (
        f"materialize: construction read a value steered by random numbers ({first.func} "
        f"{where}); while recording it was {expected!r} (simulated from the generator "
        f"state at deferred_init), under the generator state at materialize it is "
        f"{value!r}, so eager construction takes another path: {difference}. The model "
        f"was left on meta. Fix: set the seed before deferred_init and draw nothing "
        f"between deferred_init and materialize (the usual order), or construct this "
        f"module eagerly."
    )
