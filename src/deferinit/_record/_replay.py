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
caller's part too (``di.materialize`` saves them before this runs). A reseed the
construction made (``torch.manual_seed`` in its ``__init__``) is made again at its
place, as eager construction makes it at that line.

A part of a recorded model (a submodule given alone) cannot be replayed bitwise: the
draws of the whole construction come in program order. Without ``seed=`` it is refused
before anything changes; with ``seed=`` the record replays with the part's tensors
named below it, filling only them, so its own init code is kept.

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

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .._become._initialize import (
    Registration,
    apply_registered,
    mark_initialized,
    registered_for_meta,
)
from .._fill._placing import local_part
from .._shards import is_dtensor
from .._swap import exchange
from .._tensors import is_meta, kind_of
from ._deferred_init import RECORD_KEY
from ._engine import Engine
from ._errors import RecordError, ReplayError
from ._parts import part_refused, parts
from ._rerecord import current
from ._seeded import draw_owners, seed_of
from ._sharded import Normal, Sharded, Target, holders, place_sharded, targets
from ._tape import PART_KEY, Part, Points, Record, Reseed
from ._twins import TwinReplay, check_twins, twin_tensors

__all__ = ["Undo", "awaiting_replay", "changed_on_meta", "records", "replay", "replay_recorded"]

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

    Raises:
        ReplayError: without ``seed``, a part of a recorded model below ``module``
            waits for values (see :func:`parts`); before anything changes.
    """
    found: list[torch.Tensor] = []
    for name, sub, view, inside in parts(module):
        if seed is None:
            raise ReplayError(part_refused(name, sub))
        for i, where in enumerate(targets(sub, view)):
            if i in inside and isinstance(where, Normal | Sharded):
                found.append(where.placeholder if isinstance(where, Normal) else where.current)
    for name, record in records(module):
        for where in targets(module.get_submodule(name), record):
            if isinstance(where, Normal):
                found.append(where.placeholder)
            elif isinstance(where, Sharded):
                found.append(where.current)
        if seed is None:
            found += twin_tensors(record)
    return found


def changed_on_meta(module: nn.Module) -> list[str]:
    """Qualified names (below ``module``) of the recorded parameters still waiting
    on meta that an in-place operation changed after the recording: init code run
    on them (``nn.init.zeros_(model.weight)``) changed nothing, since a meta tensor
    has no values, and the replay cannot run it, since it is not in the record. A
    placeholder is made fresh when the recording ends, so its version counter
    tells (changes through ``.data``, which has a counter of its own, do not show).
    Buffers are left out: a forward in training mode on meta inputs updates running
    statistics in place, which the replay rightly starts afresh.

    >>> from torch import nn
    >>> from deferinit._record import deferred_init
    >>> model = deferred_init(nn.Linear, 2, 3)
    >>> changed_on_meta(model)
    []
    >>> _ = nn.init.zeros_(model.bias)
    >>> changed_on_meta(model)
    ['bias']
    """
    found: list[str] = []
    for name, record in records(module):
        owner = module.get_submodule(name)
        prefix = f"{name}." if name else ""
        for final, where in zip(record.finals, targets(owner, record), strict=True):
            if isinstance(where, Normal) and final.kind == "parameter":
                if is_meta(where.placeholder) and where.placeholder._version:
                    found.append(prefix + final.name)
    return found


Swap = tuple[torch.Tensor, torch.Tensor, str]  # (placeholder, real object, name for errors)


Keep = Callable[[torch.Tensor], torch.Tensor]  # what to keep of a complete full value


def _last_uses(record: Record, needed: list[bool]) -> tuple[dict[int, int], dict[int, int]]:
    """(storage -> index of the last needed operation writing it, storage -> index of
    the last needed operation touching it)."""
    written: dict[int, int] = {}
    touched: dict[int, int] = {}
    for index, op in enumerate(record.ops):
        if not needed[index]:
            continue
        made = op.writes | {sid for sid, _ in op.creates}
        for sid in made:
            written[sid] = index
        for sid in made | op.reads:
            touched[sid] = index
    return written, touched


def replay(
    record: Record,
    device: torch.device,
    seed: int | None = None,
    prefix: str = "",
    twins: TwinReplay | None = None,
    keep: Sequence[Keep | None] | None = None,
) -> list[torch.Tensor | None]:
    """The real value of final tensors of ``record`` (in ``record.finals`` order),
    running the needed operations and freeing each intermediate storage after the
    last operation that touches it.

    ``keep[i]`` says what to do with final ``i``: ``None``, leave it (it holds values
    already; the result is ``None``); a function, apply it to the full value as soon
    as that is complete (this rank's slice), then free the full storage once nothing
    later reads it. By default every final still on meta is kept whole, to the end.
    With ``seed``, random operations draw from per-tensor generators (see
    ``_seeded``), never from the default ones. With ``twins``, the deferred layers
    declared in the recording are constructed, and their queued init calls run, at
    their places (see ``_twins``)."""
    finals = record.finals
    if keep is None:
        keep = [_whole if is_meta(f.placeholder) else None for f in finals]
    if all(k is not None for k in keep):
        plan = record.plan or record.make_plan()
    else:
        plan = record.make_plan(f for f, k in zip(finals, keep, strict=True) if k is not None)
    # Finals kept in part: taken after their storage's last write, freed after its last use.
    partial = {i for i, k in enumerate(keep) if k is not None and k is not _whole}
    written, touched = _last_uses(record, plan.needed) if partial else ({}, {})
    whole_storages = {f.ref.storage for f, k in zip(finals, keep, strict=True) if k is _whole}
    take_after: dict[int, list[int]] = {}
    drop_after: dict[int, list[int]] = {}
    for i in partial:
        sid = finals[i].ref.storage
        take_after.setdefault(written.get(sid, -1), []).append(i)
        if sid not in whole_storages:
            drop_after.setdefault(touched.get(sid, -1), []).append(sid)
    values: list[torch.Tensor | None] = [None] * len(finals)
    engine = Engine(device, record.default_device, record.externals)
    # A sharded value's full storage is needed only until its slice is taken.
    engine.pooled = {sid for sids in drop_after.values() for sid in sids}
    owners = draw_owners(record, prefix) if seed is not None else {}
    generators: dict[str, torch.Generator] = {}
    points = Points(torch.default_generator)  # the replay's own states, for restores

    def settle(index: int) -> None:
        for i in take_after.get(index, ()):
            values[i] = keep[i](engine.tensor(finals[i].ref))  # type: ignore[misc]
        engine.free(drop_after.get(index, ()))

    with torch.no_grad():
        settle(-1)  # externals given to the construction, never written
        for index, op in enumerate(record.ops):
            if not plan.needed[index]:
                continue
            if isinstance(op.event, Reseed):
                if seed is None:  # seed=: every draw from its own generator
                    points.reseed(op.event)
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
            settle(index)
        if twins is not None:
            twins.finish()
        for i, k in enumerate(keep):
            if k is _whole:
                values[i] = engine.tensor(finals[i].ref)
        return values


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``keep`` marker: the final is kept whole, to the end."""
    return t


def _real(
    placeholder: torch.Tensor, value: torch.Tensor, dtype: torch.dtype | None, convert: bool
) -> torch.Tensor:
    """The object swapped into the placeholder: same class, requires_grad, and
    ``dtype`` applied as ``module.to(dtype)`` would (floating parameters and buffers);
    without ``dtype``, the placeholder's own floating dtype, where the model was
    converted after its recording (``model.to(torch.bfloat16)`` before
    ``di.materialize``), as that conversion after eager construction would."""
    if dtype is None and placeholder.is_floating_point():
        dtype = placeholder.dtype
    if dtype is not None and convert and value.is_floating_point() and value.dtype != dtype:
        value = value.to(dtype)
    grad = placeholder.requires_grad
    if isinstance(placeholder, nn.Parameter):
        return nn.Parameter(value, requires_grad=grad)
    return value.requires_grad_(grad)


def _keep(where: Target, device: torch.device, dtype: torch.dtype | None) -> Keep | None:
    if where is None:
        return None
    if isinstance(where, Sharded):
        return where.keep(device, dtype)
    return _whole


def _swaps(
    record: Record,
    where: list[Target],
    values: list[torch.Tensor | None],
    dtype: torch.dtype | None,
) -> list[Swap]:
    return [
        (
            f.placeholder,
            _real(f.placeholder, v, dtype, f.kind != "attribute"),
            f"{f.name!r} ({f.kind})",
        )
        for f, w, v in zip(record.finals, where, values, strict=True)
        if isinstance(w, Normal) and v is not None
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


def _record_restorer(module: nn.Module, record: Record | Part, key: str) -> Undo:
    def back() -> None:
        module.__dict__[key] = record

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


def _run_registered(
    module: nn.Module, found: list[tuple[str, Record]], names: dict[int, str]
) -> None:
    """Initializers registered with ``di.initialize`` on recorded modules run on their
    own tensors once the replay has filled them, in registration order, as
    ``di.materialize`` runs them on modules declared on meta. Twins ran theirs at their
    construction; a ``None`` registration (the module's own initialization) is what
    the replay gave already."""
    seen: set[int] = set()
    for name, _ in found:
        for sub in module.get_submodule(name).modules():
            registered = registered_for_meta(sub)
            if registered is None or "_di" in sub.__dict__ or id(sub) in seen:
                continue
            seen.add(id(sub))
            name = names.get(id(sub), "")
            if any(is_dtensor(t) for t in [*sub._parameters.values(), *sub._buffers.values()]):
                _registered_on_whole(sub, registered, name)
            else:
                apply_registered(sub, registered, recurse=False, name=name)
            mark_initialized(sub, recurse=False)


def _registered_on_whole(sub: nn.Module, registered: Registration, name: str) -> None:
    """Run ``registered`` on a stand-in of the sharded module ``sub`` holding each of
    its sharded tensors whole (gathered from every rank, one layer at a time), as a
    single process runs it (``orthogonal_`` needs the whole matrix; a random fill
    draws for all of it), then keep each rank's slice of the result."""
    stand_in = object.__new__(type(sub))
    stand_in.__dict__.update(sub.__dict__)
    stand_in._parameters, stand_in._buffers = {}, {}
    whole: dict[int, torch.Tensor] = {}  # sharded tensor -> its whole value (ties kept)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    tables: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (sub._parameters, stand_in._parameters),
        (sub._buffers, stand_in._buffers),
    ]
    for table, stand_in_table in tables:
        for leaf, t in table.items():
            if t is None or not is_dtensor(t):
                stand_in_table[leaf] = t  # changed in place where it is
                continue
            held = whole.get(id(t))
            if held is None:
                with torch.no_grad():
                    gathered = t.full_tensor()  # type: ignore[attr-defined]
                held = (
                    nn.Parameter(gathered, t.requires_grad)
                    if table is sub._parameters
                    else gathered
                )
                whole[id(t)] = held
                pairs.append((t, held))
            stand_in_table[leaf] = held
    apply_registered(stand_in, registered, recurse=False, name=name)
    with torch.no_grad():
        for t, held in pairs:
            local = t.to_local()  # type: ignore[attr-defined]
            local.copy_(local_part(t, held.detach(), local.device, None))


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
    pieces: list[tuple[str, nn.Module, Record, set[int] | None]] = [
        (name, module.get_submodule(name), record, None) for name, record in found
    ]
    for name, sub, view, own in parts(module):
        if seed is None:
            raise ReplayError(part_refused(name, sub))
        pieces.append((name, sub, view, own))
    names = {id(sub): name for name, sub in module.named_modules()}
    try:
        pairs: list[Swap] = []
        for name, owner, record, inside in pieces:
            where = targets(owner, record)
            if inside is not None:  # a part: only its own tensors
                where = [w if i in inside else None for i, w in enumerate(where)]
            twins = None
            if seed is None:
                twins = TwinReplay(target, names)
                twins.skip = {id(f.placeholder) for f in record.finals}
            if all(w is None for w in where) and not (twins and twin_tensors(record)):
                continue  # every value loaded already: nothing to draw or fill
            if seed is None:
                record = current(record, target)  # guards from the state eager starts at
            keep = [_keep(w, target, dtype) for w in where]
            values = replay(record, target, seed, f"{name}." if name else "", twins, keep)
            twin_made = _twin_swaps(twins, dtype) if twins is not None else []
            made = _swaps(record, where, values, dtype) + twin_made
            done = sum(v.numel() * v.element_size() for v in values if v is not None)
            done += sum(n.numel() * n.element_size() for _, n, _ in twin_made)
            for w, v in zip(where, values, strict=True):
                if isinstance(w, Sharded) and v is not None:
                    place_sharded(w, v, log)  # type: ignore[arg-type]
            if twins is not None:
                held = holders(module)
                for sharded, value in twins.sharded:
                    w = Sharded(sharded, held[id(sharded)])
                    place_sharded(w, w.keep(target, dtype)(value), log)  # type: ignore[arg-type]
            pairs += made
            if advance is not None:
                advance(done)
            del values, made, twin_made
        _swap_all(pairs, log)
        _run_registered(module, [(name, view) for name, _, view, _ in pieces], names)
        for name, record in found:
            owner = module.get_submodule(name)
            del owner.__dict__[RECORD_KEY]
            log.append(_record_restorer(owner, record, RECORD_KEY))
            for sub in owner.modules():  # its parts: nothing of it is left to replay
                part = sub.__dict__.get(PART_KEY)
                if isinstance(part, Part) and part.record is record:
                    del sub.__dict__[PART_KEY]
                    log.append(_record_restorer(sub, part, PART_KEY))
    except BaseException:
        if undo is None:
            for action in reversed(log[mark:]):
                action()
            del log[mark:]
        raise
    return module
