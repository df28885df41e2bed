"""What a recorded construction is made of: tensor descriptors, operations, and the
plan that replays them with the least memory.

A tensor is never held, only described: the storage it views (a small integer,
numbered in order of first appearance), its shape, stride, storage offset and
dtype. An operation is the aten overload with its arguments, tensors replaced by
descriptors. Cost per recorded operation: one ``Op`` tuple (~100 bytes) plus the
encoded arguments (a ``TensorRef`` is ~150 bytes with its shape and stride tuples);
views are not recorded at all, a literal keeps its (small) value.

>>> import torch
>>> ref = TensorRef(0, (2, 3), (3, 1), 0, torch.float32)
>>> ref.numel
6
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "PART_KEY",
    "Applied",
    "Declared",
    "Final",
    "Op",
    "Part",
    "Plan",
    "Points",
    "Queued",
    "Record",
    "Reseed",
    "TensorRef",
    "keep_twin_part",
    "map_refs",
    "part_of",
    "refs_in",
]


class TensorRef(NamedTuple):
    """A tensor, by the storage it views and how it views it."""

    storage: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor, storage: int) -> TensorRef:
        """The descriptor of ``t``, given the number of the storage it views."""
        shape, stride = tuple(t.shape), tuple(t.stride())
        return cls(storage, shape, stride, int(t.storage_offset()), t.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Op(NamedTuple):
    """One recorded operation.

    ``outs`` are the flattened tensor outputs (``None`` where an output is not a
    tensor); ``creates`` the storages this operation brings into being (each with its
    size in bytes); ``reads``/``writes`` the storages it reads and mutates; ``literal``
    the value of a ``torch.tensor(...)``-style constant or of a value computed at
    record time (then ``func`` is ``None``). ``guard`` marks a value read whose
    answer at record time came from simulated random numbers: replay computes it
    again and stops if eager construction would have read another value.
    """

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outs: tuple[TensorRef | None, ...]
    creates: tuple[tuple[int, int], ...]
    reads: frozenset[int]
    writes: frozenset[int]
    random: bool
    literal: torch.Tensor | None = None
    guard: Any = None  # a value read steered by random numbers: (expected value, where)
    event: Declared | Queued | Applied | Reseed | None = None  # its place in program order


class Declared(NamedTuple):
    """A deferred layer was declared here: replay constructs it here, sizes known."""

    layer: nn.Module


class Queued(NamedTuple):
    """An init call was queued here on a deferred layer's placeholder: replay runs it
    here, on the layer's fresh tensor (``call`` as ``_declare._pending`` keeps it)."""

    placeholder: torch.Tensor
    call: Any
    layer: nn.Module | None  # the deferred layer it belongs to, and its name there:
    leaf: str  # sharding may put another object at that name before replay


class Applied(NamedTuple):
    """``layer.apply(fn)`` was called here on a deferred layer: replay runs ``fn`` over
    the layer's fresh module here, in program order (``self.apply(init)`` in a
    model's ``__init__`` reaches each layer between the modules around it)."""

    layer: nn.Module
    fn: Any


class Reseed(NamedTuple):
    """The construction set the default CPU generator here (``torch.manual_seed``,
    ``torch.set_rng_state``): replay sets it here too, as eager construction does at
    that line. Seen at the next draw (or at the end) as a changed state, since the
    recording itself draws nothing."""

    state: torch.Tensor  # the CPU generator's state right after (as recorded)
    seed: int | None  # the seed, when the state is a fresh torch.manual_seed(seed)
    # A restore (``torch.random.fork_rng``'s exit): the state is the one the generator
    # held at an earlier point, which depends on the state the replay started from.
    # The point: 0, the construction's start; k, right before the k-th reseed.
    back: int | None = None
    # Only a point to go back to (``torch.get_rng_state()`` read the state here):
    # nothing is set.
    mark: bool = False


class Points:
    """Replays reseeds on ``generator`` (the default CPU one, or the simulation's
    private one), keeping its state at each point a restore may go back to: the start
    and right before each reseed, as this run has them.

    >>> g = torch.Generator().manual_seed(3)
    >>> points = Points(g)
    >>> points.reseed(Reseed(torch.Generator().manual_seed(1).get_state(), 1))
    >>> g.initial_seed()
    1
    >>> points.reseed(Reseed(torch.empty(0), None, back=1))  # fork_rng's exit
    >>> g.initial_seed()
    3
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.saved = [generator.get_state()]

    def reseed(self, event: Reseed) -> None:
        """Set the generator as the construction did at ``event``."""
        before = self.generator.get_state()
        if event.mark:
            pass
        elif event.back is not None:
            self.generator.set_state(self.saved[event.back])
        elif event.seed is not None and self.generator is torch.default_generator:
            torch.manual_seed(event.seed)  # every device, as torch.manual_seed does
        else:
            self.generator.set_state(event.state)
        self.saved.append(before)


class Final(NamedTuple):
    """A tensor the constructed model holds: its meta placeholder and what it views."""

    placeholder: torch.Tensor
    ref: TensorRef
    kind: str  # "parameter", "buffer" or "attribute"; used only for dtype= and messages
    name: str  # first qualified name it was found under


@dataclass
class Plan:
    """Which operations a replay must run, and after which one each storage is freed.

    A non-random operation whose results reach no final tensor and no later needed
    operation is skipped; a random one always runs, so every later draw sees the
    generator where eager construction left it.
    """

    needed: list[bool]
    free_after: list[list[int]]


PART_KEY = "_di_recorded_in"  # on each submodule of a recorded model: its Part


class Part(NamedTuple):
    """What a submodule of a recorded model knows of it: the record (kept on the
    recorded module) and its own qualified name there."""

    record: Record
    name: str


# A deferred layer declared in a recording: di.build gives it a new ``__dict__`` (its
# PART_KEY is lost there), so its Part is kept here too, the record weakly (the record
# holds the layer: a strong reference would keep both alive for ever).
_TWIN_PARTS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[Record], str]] = (
    weakref.WeakKeyDictionary()
)


def keep_twin_part(layer: nn.Module, part: Part) -> None:
    """Remember that ``layer``, declared in a recording, is ``part`` of its model."""
    _TWIN_PARTS[layer] = (weakref.ref(part.record), part.name)


def part_of(module: nn.Module) -> Part | None:
    """The Part ``module`` is of a recorded model, or ``None``."""
    part = module.__dict__.get(PART_KEY)
    if isinstance(part, Part):
        return part
    found = _TWIN_PARTS.get(module)
    record = found[0]() if found is not None else None
    return None if record is None or found is None else Part(record, found[1])


Rerun = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


@dataclass
class Record:
    """A whole recorded construction, kept on the module ``deferred_init`` returned."""

    default_device: torch.device
    start_state: torch.Tensor | None = None  # the default generator's state at recording
    ops: list[Op] = field(default_factory=list)
    externals: dict[int, torch.Tensor] = field(default_factory=dict)
    finals: list[Final] = field(default_factory=list)
    plan: Plan | None = None
    # Kept only where a read value steers the construction (a guard): the factory and
    # its arguments, to record again from the state at materialize (see _rerecord),
    # and the plain Python values the construction left, to compare with that run.
    rerun: Rerun | None = None
    fingerprint: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """Operators by name: aten overloads cannot be pickled themselves, so a
        recorded model can be pickled (and deep-copied) before ``materialize``. The
        factory is left out (a lambda cannot be pickled): an unpickled record with a
        guard replays under the state at deferred_init only."""
        state = dict(self.__dict__)
        state["ops"] = [op._replace(func=_name_of(op.func)) for op in self.ops]
        state["rerun"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        """A copy records again with the same factory and arguments (not copied)."""
        new = Record.__new__(Record)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        new.rerun = self.rerun
        return new

    @property
    def guarded(self) -> bool:
        """Whether a value read steered by random numbers chose the path recorded."""
        return any(op.guard is not None for op in self.ops)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["ops"] = [op._replace(func=_overload(op.func)) for op in state["ops"]]
        self.__dict__.update(state)

    def make_plan(self, wanted: Iterable[Final] | None = None) -> Plan:
        """Liveness in one backward pass: the storages of ``wanted`` finals (default:
        all) live to the end; an operation is needed if it draws random numbers, is a
        deferred layer's event, or writes a live storage, and then what it reads or
        writes is live before it. Only the plan of all finals is kept."""
        chosen = self.finals if wanted is None else list(wanted)
        live = {f.ref.storage for f in chosen}
        keep = set(live)
        needed = [False] * len(self.ops)
        free_after: list[list[int]] = [[] for _ in self.ops]
        last_seen: set[int] = set(keep)
        for index in range(len(self.ops) - 1, -1, -1):
            op = self.ops[index]
            touched = op.reads | op.writes | {sid for sid, _ in op.creates}
            must = op.random or op.guard is not None or op.event is not None
            if not (must or (touched - op.reads) & live or op.writes & live):
                continue
            needed[index] = True
            live |= touched
            # The last needed operation touching a storage frees it (unless final).
            fresh = [sid for sid in touched if sid not in last_seen]
            free_after[index].extend(sorted(fresh))
            last_seen.update(fresh)
        plan = Plan(needed, free_after)
        if wanted is None:
            self.plan = plan
        return plan

    def events(self) -> list[Declared | Queued | Applied]:
        """The deferred layers declared, and init calls queued and functions applied
        on them, in order."""
        return [op.event for op in self.ops if isinstance(op.event, Declared | Queued | Applied)]


def _name_of(func: Any) -> str | None:
    return None if func is None else str(func._schema.name + "." + (func._overloadname))


def _overload(name: str | None) -> Any:
    """``"aten::empty.memory_format"`` -> ``torch.ops.aten.empty.memory_format``."""
    if name is None:
        return None
    namespace, _, rest = name.partition("::")
    packet, _, overload = rest.rpartition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload)


def map_refs(value: Any, fn: Callable[[Any], Any], kind: type) -> Any:
    """``value`` with every instance of ``kind`` replaced by ``fn(it)``, through the
    tuples, lists and dicts aten arguments are made of."""
    if isinstance(value, kind):
        return fn(value)
    if isinstance(value, tuple | list):
        return type(value)(map_refs(v, fn, kind) for v in value)
    if isinstance(value, dict):
        return {k: map_refs(v, fn, kind) for k, v in value.items()}
    return value


def refs_in(value: Any, kind: type) -> list[Any]:
    """Every instance of ``kind`` inside ``value`` (tuples, lists, dicts), in order."""
    found: list[Any] = []
    map_refs(value, found.append, kind)
    return found
