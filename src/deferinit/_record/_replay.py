"""Replaying records: the first step of ``di.materialize``.

Every record below the module replays in program order on the target device:
random operations draw from the default generator in eager's order, so under the
same ``torch.manual_seed`` the values are bitwise eager construction's. The real
tensors are then swapped under the placeholders' own objects (``_swap.exchange``),
keeping every Parameter object, so an optimizer made before trains the model.
All or nothing: the module is untouched until every value exists; each swap, and
the removal of each record, is logged on an undo list that the caller (
``di.materialize``, whose later steps may still fail) runs newest first to put
every placeholder back on meta. Putting the default generators back is the
caller's part too (``di.materialize`` saves them before this runs).

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init, replay_recorded
>>> model = deferred_init(lambda: nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
>>> weight = model[0].weight
>>> weight.device.type
'meta'
>>> replay_recorded(model)[0].weight is weight, weight.device.type
(True, 'cpu')
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .._swap import exchange
from .._tensors import is_meta, kind_of
from ._deferred_init import RECORD_KEY
from ._engine import Engine
from ._errors import RecordError, ReplayError
from ._seeded import draw_owners, seed_of
from ._tape import Record
from ._twins import TwinReplay, check_twins, twin_tensors

__all__ = ["Undo", "awaiting_replay", "records", "replay", "replay_recorded"]

M = TypeVar("M", bound=nn.Module)

# One undo step, as ``di.materialize`` logs them: puts one thing back; returns None
# (a swap back never needs a new object, so there is never a sentence to report).
Undo = Callable[[], str | None]


def records(module: nn.Module) -> list[tuple[str, Record]]:
    """Every record below ``module`` (qualified name of the recorded module), in
    ``named_modules`` order: several separately recorded models put together replay
    one after another."""
    return [
        (name, sub.__dict__[RECORD_KEY])
        for name, sub in module.named_modules()
        if RECORD_KEY in sub.__dict__
    ]


def awaiting_replay(module: nn.Module, seed: int | None = None) -> list[torch.Tensor]:
    """The meta tensors below ``module`` that :func:`replay_recorded` will fill (each
    object once): ``di.materialize`` leaves them to it, and counts their bytes. A
    tensor already given values (``di.load_state_dict``) is not filled again. With
    ``seed``, deferred layers declared in a recording are left to materialize.

    >>> from torch import nn
    >>> from deferinit._record import deferred_init
    >>> [tuple(t.shape) for t in awaiting_replay(deferred_init(nn.Linear, 2, 3))]
    [(3, 2), (3,)]
    """
    found: list[torch.Tensor] = []
    for _, record in records(module):
        found += [f.placeholder for f in record.finals if is_meta(f.placeholder)]
        if seed is None:
            found += twin_tensors(record)
    return found


Swap = tuple[torch.Tensor, torch.Tensor, str]  # (placeholder, real object, name for errors)


def replay(
    record: Record,
    device: torch.device,
    seed: int | None = None,
    prefix: str = "",
    twins: TwinReplay | None = None,
) -> list[torch.Tensor | None]:
    """The real value of every final tensor of ``record`` still on meta (in
    ``record.finals`` order; ``None`` for one that holds values already), running
    the needed operations and freeing each intermediate storage after the last
    operation that touches it. With ``seed``, random operations draw from
    per-tensor generators (see ``_seeded``), never from the default ones. With
    ``twins``, the deferred layers declared in the recording are constructed, and
    their queued init calls run, at their places (see ``_twins``)."""
    wanted = [is_meta(f.placeholder) for f in record.finals]
    if all(wanted):
        plan = record.plan or record.make_plan()
    else:
        plan = record.make_plan(f for f, w in zip(record.finals, wanted, strict=True) if w)
    engine = Engine(device, record.default_device, record.externals)
    owners = draw_owners(record, prefix) if seed is not None else {}
    generators: dict[str, torch.Generator] = {}
    with torch.no_grad():
        for index, op in enumerate(record.ops):
            if not plan.needed[index]:
                continue
            if op.event is not None:
                if twins is not None:
                    twins.run(op.event)
                continue
            if seed is not None and index in owners:
                name = owners[index]
                if name not in generators:
                    generators[name] = torch.Generator(device).manual_seed(seed_of(seed, name))
                engine.generator = generators[name]
            try:
                engine.run(op)
            except (ReplayError, RecordError):
                raise
            except Exception as error:
                raise ReplayError(
                    f"materialize: replaying operation #{index} ({op.func or 'literal'}) on "
                    f"{device} failed: {type(error).__name__}: {error}. The model was left on "
                    f"meta. Fix: check that the construction runs eagerly on {device}."
                ) from error
            engine.free(plan.free_after[index])
        return [
            engine.tensor(final.ref) if w else None
            for final, w in zip(record.finals, wanted, strict=True)
        ]


def _real(
    placeholder: torch.Tensor, value: torch.Tensor, dtype: torch.dtype | None, convert: bool
) -> torch.Tensor:
    """The object swapped into the placeholder: same class, requires_grad, and
    ``dtype`` applied as ``module.to(dtype)`` would (floating parameters and buffers)."""
    if dtype is not None and convert and value.is_floating_point():
        value = value.to(dtype)
    grad = placeholder.requires_grad
    if isinstance(placeholder, nn.Parameter):
        return nn.Parameter(value, requires_grad=grad)
    return value.requires_grad_(grad)


def _swaps(
    record: Record, values: list[torch.Tensor | None], dtype: torch.dtype | None
) -> list[Swap]:
    return [
        (
            f.placeholder,
            _real(f.placeholder, v, dtype, f.kind != "attribute"),
            f"{f.name!r} ({f.kind})",
        )
        for f, v in zip(record.finals, values, strict=True)
        if v is not None
    ]


def _twin_swaps(twins: TwinReplay, dtype: torch.dtype | None) -> list[Swap]:
    return [
        (old, _real(old, value, dtype, True), f"{name!r} ({kind_of(old)})")
        for old, value, name in twins.places
    ]


def _swapper(placeholder: torch.Tensor, new: torch.Tensor) -> Undo:
    def back() -> None:
        exchange(placeholder, new)  # back to meta: nothing else holds the fresh value

    return back


def _record_restorer(module: nn.Module, record: Record) -> Undo:
    def back() -> None:
        module.__dict__[RECORD_KEY] = record

    return back


def _swap_all(pairs: list[Swap], undo: list[Undo]) -> None:
    for placeholder, new, name in pairs:
        # Under the placeholder's own Python object (weak references, attributes and
        # gradient hooks stay with it), as everywhere in deferinit.
        why = exchange(placeholder, new)
        if why is not None:
            raise ReplayError(
                f"materialize: cannot put the value of {name} under its own object: {why}. "
                f"The model was left on meta. Fix: drop that view or graph (del it), then "
                f"call materialize again."
            )
        undo.append(_swapper(placeholder, new))


def replay_recorded(
    module: M,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    undo: list[Undo] | None = None,
    advance: Callable[[int], None] | None = None,
) -> M:
    """Replay every record below ``module`` and put real tensors in place.

    Args:
        module: a module ``deferred_init`` returned, or one holding such modules;
            parts that were not recorded are left alone (still on meta).
        device: where tensors the construction made on the default device go
            (default: torch's default device); as constructing under
            ``torch.device(device)`` would.
        dtype: converts floating-point parameters and buffers afterwards, as
            ``module.to(dtype)`` after eager construction would.
        seed: each tensor draws from its own generator, seeded from ``seed`` and its
            qualified name below ``module``; the default generators are left alone.
        undo: where to log the steps that put everything back (newest last; the
            caller runs them in reverse if a later step fails). Without it, a failure
            here is undone here.
        advance: called with the bytes of each record's tensors once they exist (the
            progress bar).

    Returns:
        ``module``, its placeholders now holding real values (same objects).

    Raises:
        RecordError: a deferred layer declared inside the recorded construction has
            no sizes yet; nothing is allocated.
        ReplayError: an operation failed on ``device``, a value read during
            construction came out differently, or a value cannot be put in place;
            every placeholder is as before.
    """
    target = torch.device(device) if device is not None else torch.get_default_device()
    log: list[Undo] = [] if undo is None else undo
    mark = len(log)
    found = records(module)
    for name, record in found:
        check_twins(module, name, record)
    names = {id(sub): name for name, sub in module.named_modules()}
    try:
        pairs: list[Swap] = []
        for name, record in found:
            if not awaiting_replay(module.get_submodule(name), seed):
                continue  # every value loaded already: nothing to draw or fill
            twins = None
            if seed is None:
                twins = TwinReplay(target, names)
                twins.skip = {id(f.placeholder) for f in record.finals}
            values = replay(record, target, seed, f"{name}." if name else "", twins)
            made = _swaps(record, values, dtype)
            if twins is not None:
                made += _twin_swaps(twins, dtype)
            pairs += made
            if advance is not None:
                advance(sum(new.numel() * new.element_size() for _, new, _ in made))
            del values, made
        _swap_all(pairs, log)
        for name, record in found:
            owner = module.get_submodule(name)
            del owner.__dict__[RECORD_KEY]
            log.append(_record_restorer(owner, record))
    except BaseException:
        if undo is None:
            for action in reversed(log[mark:]):
                action()
            del log[mark:]
        raise
    return module
