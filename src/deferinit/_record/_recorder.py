"""The dispatch mode that records a construction, above torch's ``FakeTensorMode``.

Every aten call a construction makes passes here first: the fake mode below
computes shapes (no memory, no kernels, no draws from any generator), and this
mode writes down the calls that create or change storages. A tensor is known by
its storage (``nn.Parameter(t)`` makes no aten call, but shares ``t``'s storage),
never held: holding fake tensors would keep them alive in the fake mode's memo.

What is recorded and what is not:
- an operation that creates a storage or writes one (``empty``, ``normal_``,
  ``copy_``, ``linalg_qr``...), with its arguments as descriptors;
- ``torch.tensor(literal)``/``new_tensor``: they reach dispatch as ``lift_fresh``
  of a real CPU tensor, whose value is kept as a literal;
- not views (``view``, ``t``, ``detach``, ``slice``...): a tensor read later is
  rebuilt from its descriptor, so the view itself needs no replay;
- value reads (``.item()``): answered when known at record time (see ``_values``);
- reseeds of the default CPU generator by the construction (``torch.manual_seed``,
  ``torch.set_rng_state``): the recording draws nothing, so a state changed since
  the last look is the construction's doing. It is looked at before each draw and
  deferred layer's event, and at the end, and recorded there (a ``Reseed``).

>>> import torch
>>> from torch._subclasses.fake_tensor import FakeTensorMode
>>> from deferinit._record._tape import Record
>>> record = Record(torch.device("cpu"))
>>> with FakeTensorMode() as fake, Recorder(fake, record):
...     w = torch.empty(3, 4).normal_()
>>> [str(op.func) for op in record.ops]
['aten.empty.memory_format', 'aten.normal_.default']
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .._declare._pending import owner_of
from ._errors import RecordError, where
from ._tape import Applied, Declared, Op, Queued, Record, Reseed, TensorRef, map_refs, refs_in
from ._values import Values

__all__ = ["Recorder"]

aten = torch.ops.aten
_LITERALS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_RANDOM = torch.Tag.nondeterministic_seeded


@functools.cache
def _written_positions(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an operator's schema says it writes."""
    return tuple(
        (i, a.name)
        for i, a in enumerate(func._schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    )


@functools.cache
def _takes_dtype(func: Any) -> bool:
    return any(a.name == "dtype" and a.kwarg_only for a in func._schema.arguments)


class Recorder(TorchDispatchMode):
    """Records every storage-creating or storage-writing operation into ``record``.

    Args:
        fake: the fake mode below (used to make fake tensors of values computed now).
        record: where operations are appended.
        twins: recording again at materialize, the deferred layers declared (and init
            calls queued) the first time, sizes known now: value reads simulate their
            draws (see ``_values``).
    """

    def __init__(
        self,
        fake: FakeTensorMode,
        record: Record,
        twins: Sequence[Declared | Queued | Applied] = (),
    ) -> None:
        super().__init__()
        self.fake = fake
        self.record = record
        self.values = Values(record, twins)
        self.ids: dict[int, int] = {}  # storage address -> storage number
        # Pinned so that no later storage can reuse an address while recording.
        self.pins: list[torch.UntypedStorage] = []
        self.rng = torch.default_generator.get_state()  # as last seen (reading draws nothing)
        self.seen = [self.rng]  # the states a reseed (or the start) set: a set back to one is known
        # Reseeds not undone yet (fork_rng nests): the point right before each (its
        # number in ``Reseed.back``), the state there, and whether that state came
        # from the state at the start (then a return to it is a restore).
        self.open: list[tuple[int, torch.Tensor, bool]] = []
        self.reseeds = 0
        self.relative = True  # the state now came from the state at the start
        # Whether the construction drew from the default generator since its state
        # was last set (then setting that very state again is a rewind).
        self.drawn = False
        # The states torch.get_rng_state gave the construction, by id: the tensor and
        # the reseed number of the point it was read at (a Reseed mark).
        self.snapshots: dict[int, tuple[torch.Tensor, int]] = {}

    # -- descriptors -------------------------------------------------------------
    def sid(self, t: torch.Tensor, *, create: bool = False) -> int | None:
        storage = t.untyped_storage()
        found = self.ids.get(storage._cdata)
        if found is None and create:
            found = len(self.pins)
            self.ids[storage._cdata] = found
            self.pins.append(storage)
        return found

    def ref(self, t: torch.Tensor) -> TensorRef:
        """The descriptor of an input tensor; a real tensor the construction was given
        (an argument of the factory, ``torch.from_numpy``) is an external."""
        sid = self.sid(t)
        if sid is None:
            if isinstance(t, FakeTensor):
                raise RecordError(
                    f"deferred_init: a fake tensor of shape {tuple(t.shape)} {where()} was "
                    f"made outside this recording (another FakeTensorMode?). Expected: "
                    f"every tensor of the construction made inside it. Fix: create it "
                    f"inside the factory, or pass a real tensor."
                )
            sid = self.sid(t, create=True)
            assert sid is not None
            self.record.externals[sid] = t
        return TensorRef.of(t, sid)

    # -- dispatch ----------------------------------------------------------------
    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _LITERALS:
            out = func(*args, **kwargs)
            with _disable_current_modes():
                value = args[0].detach().clone()
            self._literal(out, value)
            return out
        # Descriptors before the call: an in-place resize or restride changes them.
        enc_args = map_refs(args, self.ref, torch.Tensor)
        enc_kwargs = map_refs(kwargs, self.ref, torch.Tensor)
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            return self._read(func, args, kwargs)
        self._note(func, args, kwargs, out, enc_args, enc_kwargs)
        return out

    def _note(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        enc_args: tuple[Any, ...],
        enc_kwargs: dict[str, Any],
    ) -> None:
        inputs = refs_in((enc_args, enc_kwargs), TensorRef)
        written = [
            w
            for i, name in _written_positions(func)
            for w in refs_in(args[i] if i < len(args) else kwargs.get(name), torch.Tensor)
        ]
        results = refs_in(out, torch.Tensor)
        fresh = [r for r in results if self.sid(r) is None]
        if not fresh and not written:
            return  # a view or a query: nothing to replay
        if not inputs and results and _takes_dtype(func) and enc_kwargs.get("dtype") is None:
            # A factory's dtype left to the default: fix it now, since the default
            # dtype may differ at replay (transformers sets it around construction).
            enc_kwargs = {**enc_kwargs, "dtype": results[0].dtype}
        random = _RANDOM in func.tags
        if random:
            self.reseeded()
            self.drawn = self.drawn or kwargs.get("generator") is None
        creates: list[tuple[int, int]] = []
        for r in fresh:
            if self.sid(r) is None:
                sid = self.sid(r, create=True)
                creates.append((sid, r.untyped_storage().nbytes()))  # type: ignore[arg-type]
        outs = tuple(self.ref(r) for r in results)
        self.record.ops.append(
            Op(
                func,
                enc_args,
                enc_kwargs,
                outs,
                tuple(creates),
                frozenset(r.storage for r in inputs),
                frozenset(self.sid(t) for t in written),  # type: ignore[misc]
                random,
            )
        )

    def reseeded(self) -> None:
        """Record a reseed of the default CPU generator since the last look, here.
        A reseed to the very state last seen cannot be told from none. A return to
        the state right before the last reseed not undone, where that state came
        from the state at the start, is a restore (``fork_rng``'s exit): replayed as
        the state the replay had there. Any other state is set as recorded (a state
        an earlier reseed set is that reseed again). Any other change is not the
        factory's to record: another thread drew from the generator meanwhile (the
        recording itself draws nothing), which replaying would undo for that thread
        (DESIGN §3.6); so is a state set that is neither a seed's nor one seen here."""
        with _disable_current_modes():  # real tensors, compared for real
            state = torch.default_generator.get_state()
            if torch.equal(state, self.rng):
                return
            back = None
            if self.open and self.open[-1][2] and torch.equal(self.open[-1][1], state):
                back = self.open.pop()[0]
            seed = torch.default_generator.initial_seed()
            fresh = torch.equal(torch.Generator().manual_seed(seed).get_state(), state)
            if back is None and not fresh and not any(torch.equal(state, s) for s in self.seen):
                self.rng = state  # not a reseed of the factory's: nothing recorded
                return
            self.seen.append(state)
        self.reseeds += 1
        if back is None:
            self.open.append((self.reseeds, self.rng, self.relative))
        self.rng, self.relative = state, back is not None
        self.drawn = False
        self._event(Reseed(state, seed if fresh and back is None else None, back))

    def snapshot(self, state: torch.Tensor) -> None:
        """``torch.get_rng_state()`` gave the construction ``state``: this point is
        one the replay can go back to (see :meth:`set_state`)."""
        self.reseeded()
        self.reseeds += 1
        self._event(Reseed(self.rng, None, None, mark=True))
        self.snapshots[id(state)] = (state, self.reseeds)

    def set_state(self, state: torch.Tensor) -> None:
        """``torch.set_rng_state(state)`` is about to run in the construction. A state
        that ``torch.get_rng_state()`` read here (``fork_rng``, ``s = get_rng_state();
        ...; set_rng_state(s)``) is replayed as going back to where it was read, as
        the replay has it there: the recording draws nothing, so every state it reads
        looks alike and only the point tells them apart. Setting a state of unknown
        origin equal to the one last set, after draws, cannot be told from no change:
        refused. Any other state is seen at the next look."""
        self.reseeded()
        if isinstance(state, FakeTensor):
            raise RecordError(
                f"deferred_init: the construction sets the random generator "
                f"(torch.set_rng_state {where()}) to a tensor it computed while recorded "
                f"(a clone of a state it read?), whose values the recording does not hold. "
                f"Nothing was recorded. Expected: the very tensor torch.get_rng_state "
                f"returned. Fix: set back the state torch.get_rng_state returned, without "
                f"cloning it, or give the draws a torch.Generator of their own."
            )
        read = self.snapshots.get(id(state))
        if read is not None and read[0] is state:
            self.reseeds += 1
            self._event(Reseed(self.rng, None, read[1]))
            with _disable_current_modes():
                self.rng = state.clone()  # what the generator holds once it is set
            self.drawn = False
            return
        with _disable_current_modes():
            rewind = self.drawn and torch.equal(state.cpu(), self.rng)
        if rewind:
            raise RecordError(
                f"deferred_init: the construction sets the random generator back "
                f"(torch.set_rng_state {where()}) to a state it did not read with "
                f"torch.get_rng_state after drawing from it, which the recording cannot "
                f"replay: it draws nothing, so every state looks alike. Nothing was "
                f"recorded. Expected: a state read with torch.get_rng_state in the "
                f"construction. Fix: read it with torch.get_rng_state, give the draws a "
                f"torch.Generator of their own (generator=...), or construct the model "
                f"eagerly."
            )

    # -- deferred layers (told by the declare stage, see _declare._recording) ----
    def declared(self, layer: nn.Module) -> None:
        """A deferred layer declared now: replay constructs it at this place."""
        self.reseeded()
        self._event(Declared(layer))

    def queued(self, placeholder: torch.Tensor, call: Any) -> None:
        """An init call queued now on a deferred layer's placeholder: replay runs it
        at this place. Its other tensor arguments must exist at replay too."""
        _, func, args, kwargs = call
        made_here = [
            t
            for t in refs_in((args[1:], kwargs), torch.Tensor)
            if isinstance(t, FakeTensor) and t is not placeholder
        ]
        if made_here:
            raise RecordError(
                f"deferred_init: {getattr(func, '__qualname__', func)} on a deferred "
                f"layer's placeholder {where()} takes a tensor the construction made. "
                f"Expected: initialization with numbers only (normal_(0, 0.01), zeros_, "
                f"fill_(1.0)) while the sizes are unknown. Fix: give that layer its sizes "
                f"(torch.nn instead of deferinit.nn), or register the init with "
                f"di.initialize(layer, init)."
            )
        self.reseeded()
        self._event(Queued(placeholder, call, *owner_of(placeholder)))

    def applied(self, layer: nn.Module, fn: Any) -> None:
        """``layer.apply(fn)`` on a deferred layer now: replay runs ``fn`` over the
        layer's fresh module at this place."""
        self.reseeded()
        self._event(Applied(layer, fn))

    def _event(self, event: Declared | Queued | Applied | Reseed) -> None:
        empty: frozenset[int] = frozenset()
        self.record.ops.append(Op(None, (), {}, (), (), empty, empty, False, event=event))

    def _literal(self, fake: torch.Tensor, value: torch.Tensor) -> None:
        sid = self.sid(fake, create=True)
        assert sid is not None
        ref = self.ref(fake)
        nbytes = fake.untyped_storage().nbytes()
        self.record.ops.append(
            Op(None, (), {}, (ref,), ((sid, nbytes),), frozenset(), frozenset(), False, value)
        )

    def _read(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An operation whose result depends on values (``.item()``, ``nonzero``): run
        it on the values eager construction has now (see ``_values``)."""
        inputs = refs_in((args, kwargs), torch.Tensor)
        refs = [self.ref(t) for t in inputs]
        at = where()
        with _disable_current_modes():
            values, simulated = self.values.read(refs, f"deferred_init: {func} {at}")
            by_id = {id(t): v for t, v in zip(inputs, values, strict=True)}
            real_args = map_refs(args, lambda t: by_id[id(t)], torch.Tensor)
            real_kwargs = map_refs(kwargs, lambda t: by_id[id(t)], torch.Tensor)
            out = func(*real_args, **real_kwargs)
        if not simulated:
            return map_refs(out, self._adopt, torch.Tensor)
        # Steered by simulated random numbers: replay checks the value again.
        fakes = map_refs(out, self.fake.from_tensor, torch.Tensor)
        results = refs_in(fakes, torch.Tensor)
        creates = []
        for r in results:
            sid = self.sid(r, create=True)
            creates.append((sid, r.untyped_storage().nbytes()))
        self.record.ops.append(
            Op(
                func,
                map_refs(args, self.ref, torch.Tensor),
                map_refs(kwargs, self.ref, torch.Tensor),
                tuple(self.ref(r) for r in results),
                tuple(creates),  # type: ignore[arg-type]
                frozenset(r.storage for r in refs),
                frozenset(),
                False,
                guard=(out, at),
            )
        )
        return fakes

    def _adopt(self, real: torch.Tensor) -> torch.Tensor:
        """A tensor computed at record time enters the construction as a literal."""
        fake = self.fake.from_tensor(real)
        self._literal(fake, real)
        return fake
