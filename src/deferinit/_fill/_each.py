"""Initialize one tensor of a layer at a time, with the values the whole layer's
initialization would give it.

A layer's constructor (or ``reset_parameters``) initializes all of its tensors
together. To hand out each tensor's value while holding about one tensor's memory
(FSDP2 and tensor-parallel shards: each rank keeps a slice of every parameter),
the initialization runs once, each tensor written on a stand-in and its wanted
part kept as soon as the next tensor is written (:mod:`deferinit._fill._once`).

Where that one run cannot be followed, it runs once per group of wanted tensors
instead, under :class:`_Mirror`, a dispatch mode in which

* operations on the *wanted* tensors, and on scratch tensors the initialization
  computes with, run as usual;
* operations on the *other* tensors of the layer (known by their storage, from the
  module registration hooks) only keep the random generator in step: a random fill
  runs on a throw-away tensor of the same size and strides (a generator's
  consumption depends on the size, strides, dtype and device of what it fills,
  never on the values), every other write is skipped, so their ``torch.empty``
  pages are never touched.

So the generator advances exactly as in one eager initialization, whose values the
wanted tensors get bitwise, and extra memory peaks at the wanted group (at most the
largest tensor of the layer) plus one throw-away fill. Whatever the mirror cannot
follow (a value read from another tensor of the layer, a tensor subclass) raises
:class:`Fallback`, and that group is initialized with the whole layer instead:
more memory, never different values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from .._random import RANDOM, Drawing, Generators
from .._tensors import construct_on_meta
from ._dispatch import (
    Fallback,
    RegisteredStorageMode,
    dry_run,
    named_tensors,
    registrations,
    saved_generators,
    written_args,
)
from ._once import METADATA, Keep, Scratch, once
from ._streams import seeded_whole, streams

__all__ = ["each_tensor"]

aten = torch.ops.aten


class _Mirror(RegisteredStorageMode):
    """Runs an initialization for real, except on the layer's tensors other than the
    wanted one: their random fills go to a throw-away tensor, their other writes
    are skipped, and reading their values gives up (:class:`Fallback`)."""

    def __init__(self, wanted: set[int], seen: list[torch.Tensor], replay: bool) -> None:
        super().__init__(seen)
        self.wanted = wanted
        self.replay = replay  # keep the generator in step (else other fills are skipped)

    def _other(self, t: torch.Tensor) -> bool:
        position = self.position(t)
        return position is not None and position not in self.wanted

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors: list[torch.Tensor] = []
        tree_map_only(torch.Tensor, tensors.append, (args, kwargs))
        others = {id(t) for t in tensors if self._other(t)}
        if not others:
            return func(*args, **kwargs)
        schema = func._schema
        written = written_args(schema, args, kwargs)
        aliasing = [r for r in schema.returns if r.alias_info is not None]
        if (not written and aliasing) or func in METADATA:
            return func(*args, **kwargs)  # a view or a new tensor: no data is read
        if not written or any(id(w) not in others for w in written):
            raise Fallback(f"{func} reads the value of another tensor of the layer")
        if len(written) != 1 or len(schema.returns) > 1:
            raise Fallback(f"{func} writes several tensors")
        # A write to another tensor: its value does not matter, the generator does.
        (target,) = written
        if self.replay and RANDOM in func.tags:
            scratch = torch.empty_strided(
                target.size(), target.stride(), dtype=target.dtype, device=target.device
            )
            func(*_swap(args, target, scratch), **_swap(kwargs, target, scratch))
            del scratch
        return target if aliasing else None


def _swap(tree: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    return tree_map_only(torch.Tensor, lambda t: new if t is old else t, tree)


def _mirrored(
    make: Callable[[], nn.Module],
    names: Sequence[str],
    wanted: set[int],
    device: torch.device,
    replay: bool,
) -> list[torch.Tensor]:
    with registrations() as seen, torch.device(device), _Mirror(wanted, seen, replay):
        module = make()
    tensors = named_tensors(module)
    return [tensors[name] for name in names]


def _groups(names: Sequence[str], sizes: dict[str, int]) -> list[list[str]]:
    """Consecutive names packed so that no group holds more bytes than the largest
    single tensor: runs are few, memory stays at one tensor's worth."""
    budget = max((sizes[n] for n in names), default=0)
    groups: list[list[str]] = []
    total = 0
    for name in names:
        if groups and total + sizes[name] <= budget:
            groups[-1].append(name)
            total += sizes[name]
        else:
            groups.append([name])
            total = sizes[name]
    return groups


def _byte_counts(
    make: Callable[[], nn.Module], names: Sequence[str], generators: Generators | None
) -> dict[str, int] | None:
    """Bytes of each named tensor, from a dry run on meta; ``None`` where that run
    fails (then one tensor per group). Without ``seed=`` only (``generators``: the
    caller's, put back after it)."""
    try:
        shapes = named_tensors(construct_on_meta(make))
    except Exception:
        return None
    finally:
        if generators is not None:
            generators.restore()
    return {n: shapes[n].numel() * shapes[n].element_size() for n in names if n in shapes}


def _plan_groups(
    dry: Callable[[], nn.Module],
    names: Sequence[str],
    order: dict[str, int] | None,
    seeds: Callable[[str], int] | None,
    generators: Generators | None,
) -> list[list[str]]:
    """The names in the groups that are initialized together."""
    sizes = None if seeds is not None or order is None else _byte_counts(dry, names, generators)
    if sizes is not None and len(sizes) == len(names):
        return _groups(names, sizes)
    if seeds is None and order is None:
        return [list(names)]  # one whole layer gives them all
    return [[name] for name in names]


def each_tensor(
    make: Callable[[], nn.Module],
    names: Sequence[str],
    device: torch.device,
    seeds: Callable[[str], int] | None = None,
    *,
    construct: Callable[[], nn.Module] | None = None,
    keep: Keep | None = None,
    scratch: Scratch | None = None,
    known: Callable[[set[str] | None], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, value)`` for each wanted tensor of the module ``make``
    creates and initializes, never holding more than about one tensor's bytes
    besides what is kept: ``keep(name, full value)`` (default: the full value), as
    each tensor is produced.

    One run of the initialization where :func:`~deferinit._fill._once.once` can
    follow it, else a run per group of tensors (the mirror, :class:`_Mirror`).
    Without ``seeds`` every value is what one run of ``make`` from the current
    generator state gives, and the generators (torch's CPU and target device's,
    Python's ``random``) end where that run leaves them. With ``seeds`` the tensor
    ``name`` is initialized alone, its draws from a generator seeded with
    ``seeds(name)`` (the same values :func:`seeded_whole` gives); where its value
    needs the layer's other tensors, from one run of the layer (per-tensor streams,
    else the stream ``seeds("")``). The process-wide generators are then left
    alone: every draw comes from a private generator or gives up before drawing
    (:class:`Fallback`), so nothing is saved or put back, and another thread's draws
    meanwhile stand (what the code draws from Python's ``random`` is its own).

    ``construct`` builds the module without running what initializes it beyond its
    constructor (a registered initializer): the dry runs on meta, which learn the
    registration order and sizes, use it, so that user code runs only where its
    values are used (default: ``make``). ``scratch`` lends the memory tensors are
    written in before their part is kept (default: new for this call). ``known``
    is given the names of every tensor the dry run on meta made (``None`` where it
    failed) before anything runs for real; it raises to refuse.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> want = nn.Linear(3, 2).weight.detach()
    >>> _ = torch.manual_seed(0)
    >>> [(n, torch.equal(v, want)) for n, v in each_tensor(
    ...     lambda: nn.Linear(3, 2), ["weight"], torch.device("cpu"))]
    [('weight', True)]
    """
    # Without seeds, each run starts from the caller's generators as they are now.
    generators = saved_generators(device) if seeds is None else None
    dry = make if construct is None else construct
    ran = dry_run(dry)
    if generators is not None:
        generators.restore()  # the code's own draws besides torch's (Python's random)
    if known is not None:
        known(None if ran is None else ran[1])
    order = None if ran is None else ran[0]
    kept = keep if keep is not None else _whole
    source = _Source(make, device, seeds, construct, generators)
    try:
        values = source.once(names, order, kept, scratch)
        if values is None:
            yield from _by_groups(source, dry, names, order, kept)
        else:
            for name in names:
                yield name, values.pop(0)  # popped: the caller may free each one
    finally:
        source.close()


def _whole(name: str, value: torch.Tensor) -> torch.Tensor:
    return value


def _by_groups(
    source: _Source,
    dry: Callable[[], nn.Module],
    names: Sequence[str],
    order: dict[str, int] | None,
    keep: Keep,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`each_tensor`'s longer way: the initialization runs once per group."""
    groups = _plan_groups(dry, names, order, source.seeds, source.generators)
    for group in groups:
        values = source.group(group, order)
        for name in group:
            yield name, keep(name, values.pop(0))
        del values
    if not names and source.seeds is None:
        with source.drawing(""), torch.device(source.device):
            source.make()  # the generators advance as one initialization would


class _Source:
    """Where :func:`each_tensor`'s values come from: the mirror where it can follow
    the initialization, else a whole layer. With ``seeds``, that layer runs once,
    with a stream per tensor if it can (:func:`seeded_whole`), else with the layer's
    own stream (``seeds("")``): its tensors keep whatever relations their
    initialization makes."""

    def __init__(
        self,
        make: Callable[[], nn.Module],
        device: torch.device,
        seeds: Callable[[str], int] | None,
        construct: Callable[[], nn.Module] | None,
        generators: Generators | None,
    ) -> None:
        self.make = make
        self.device = device
        self.seeds = seeds
        self.construct = construct
        self.generators = generators  # without seeds: put back before each run
        self.seeded_layer: nn.Module | None = None  # with seeds: the one whole run

    def drawing(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """Where the draws for ``name`` come from: the caller's generators rewound,
        or (``seeds``) a private generator, which other threads cannot disturb."""
        if self.seeds is not None:
            return Drawing(self.seeds(name))
        if self.generators is not None:
            self.generators.restore()
        return contextlib.nullcontext()

    def once(
        self,
        names: Sequence[str],
        order: dict[str, int] | None,
        keep: Keep,
        scratch: Scratch | None,
    ) -> list[torch.Tensor] | None:
        """Every kept value from one run (:func:`once`), or ``None`` where that run
        cannot be followed (the generators are rewound by the longer way)."""
        if not names or order is None or any(name not in order for name in names):
            return None
        if self.seeds is not None and self.device.type != "cpu":
            return None  # per-tensor streams in one run: CPU only, as seeded_whole
        stream = None if self.seeds is None else streams(order, self.seeds, names)
        try:
            return once(self.make, names, order, self.device, keep, stream, scratch)
        except Fallback:
            return None

    def group(self, group: list[str], order: dict[str, int] | None) -> list[torch.Tensor]:
        """The values of ``group``'s tensors, in its order."""
        if order is None or any(name not in order for name in group):
            return self.whole(group)  # no dry run, or a name it did not register
        wanted = {order[name] for name in group}
        try:
            with self.drawing(group[0]):
                replay = self.seeds is None
                return _mirrored(self.make, group, wanted, self.device, replay=replay)
        except Fallback:
            return self.whole(group)

    def whole(self, group: list[str]) -> list[torch.Tensor]:
        """``group``'s values from a whole layer."""
        if self.seeds is None:
            with self.drawing(group[0]), torch.device(self.device):
                tensors = named_tensors(self.make())
            return [tensors[name] for name in group]
        if self.seeded_layer is None:
            self.seeded_layer = self._seeded_layer(self.seeds)
        tensors = named_tensors(self.seeded_layer)
        return [tensors[name] for name in group]

    def _seeded_layer(self, seeds: Callable[[str], int]) -> nn.Module:
        module = seeded_whole(self.make, self.device, seeds, construct=self.construct)
        if module is None:
            with self.drawing(""), torch.device(self.device):
                module = self.make()
        return module

    def close(self) -> None:
        """Drop the whole layer."""
        self.seeded_layer = None
