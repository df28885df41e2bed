"""One run of a layer's initialization that keeps only the wanted part of each
tensor, as each tensor is produced (a rank's exact shards: docs/design.md §4.3).

A layer's initialization writes its tensors one after another: ``weight`` is
filled (and perhaps scaled), then ``bias``. Under :class:`_Once`, a dispatch mode,
the layer's own tensors (known by their storage, from the registration hooks) are
never touched: each one's writes go to a real stand-in of it, the *active* one,
allocated at its first write. When the initialization writes another tensor of
the layer, the active one is *set aside*: its wanted part (``keep``: a rank's
slice, or the whole value) is kept and the stand-in freed. So the initialization
runs once, for real, with every random draw in its eager order (the values are
bitwise eager's, the generators end where eager leaves them), and extra memory
peaks at one tensor of the layer.

What this cannot follow raises :class:`Fallback`, and the caller goes the longer
way (:mod:`deferinit._fill._each`), never to different values: a read of a tensor
already set aside (``b.copy_(a)`` after ``b`` was filled), one operation writing
two of the layer's tensors, or writing one while reading another that is active,
a partial write to a tensor set aside, changing a tensor's storage (``set_``), or a
tensor subclass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import arg_tree_leaves, tree_map_only

from .._random import RANDOM
from ._dispatch import (
    Fallback,
    RegisteredStorageMode,
    named_tensors,
    registrations,
    written_args,
)
from ._hugepages import advise

__all__ = ["METADATA", "Keep", "Scratch", "once"]

aten = torch.ops.aten

# What is kept of a tensor's full value, by the tensor's name.
Keep = Callable[[str, torch.Tensor], torch.Tensor]

# Operations that read only a tensor's size, strides, dtype and device.
METADATA = {
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
}

# In-place operations that write every element of their target without reading it.
_OVERWRITE = {aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default, aten.copy_.default}

# Operations that change which memory a tensor views.
_RESTRIDE = {aten.set_, aten.resize_, aten.resize_as_, aten.as_strided_}

_Geometry = tuple[torch.Size, tuple[int, ...], int, torch.dtype]


def _geometry(t: torch.Tensor) -> _Geometry:
    return t.size(), t.stride(), int(t.storage_offset()), t.dtype


def _covers(t: torch.Tensor) -> bool:
    """Whether ``t`` views every element of its storage, once each."""
    if t.storage_offset() != 0 or t.numel() * t.element_size() != t.untyped_storage().nbytes():
        return False
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.size(), strict=True)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


class Scratch:
    """One buffer for the stand-ins of tensors written one after another, reused
    across tensors and layers: the pages of a fresh allocation cost about as much
    to touch and to give back as a random fill costs to write them. At most one
    buffer, the largest stand-in so far (held until the caller drops this object).

    >>> import torch
    >>> scratch = Scratch()
    >>> a = scratch.take(4, torch.float32, torch.device("cpu"))
    >>> scratch.give_back(a, [])
    []
    >>> b = scratch.take(2, torch.float64, torch.device("cpu"))
    >>> a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    True
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # bytes, free for the next stand-in

    def take(self, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``count`` uninitialized elements of ``dtype`` on ``device``."""
        nbytes = count * dtype.itemsize
        buffer, self.buffer = self.buffer, None
        if buffer is None or buffer.device != device or buffer.numel() < nbytes:
            del buffer  # freed before the next one is allocated
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            advise(buffer)  # huge pages where large and available, before the first touch
        return buffer[:nbytes].view(dtype)

    def give_back(self, flat: torch.Tensor, kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """``flat`` (from :meth:`take`) is free again; ``kept`` as they may be held:
        a value viewing ``flat`` becomes its own copy, unless ``flat`` is a whole
        buffer, which then goes with it."""
        storage = flat.untyped_storage()
        whole = flat.numel() * flat.element_size() == storage.nbytes()
        free = True
        held = []
        for value in kept:
            if value.untyped_storage().data_ptr() == storage.data_ptr():
                if whole:
                    free = False
                else:
                    value = value.clone()
            held.append(value)
        if free:
            self.buffer = torch.empty(0, dtype=torch.uint8, device=flat.device).set_(storage)
        return held


class _Once(RegisteredStorageMode):
    """Runs an initialization for real, with each of the layer's tensors written
    on a stand-in, one at a time, and its wanted part kept when the next is
    written (see the module's docstring)."""

    def __init__(
        self, seen: list[torch.Tensor], wanted: dict[int, list[str]], keep: Keep, scratch: Scratch
    ) -> None:
        super().__init__(seen)
        self.wanted = wanted  # registration position -> the names wanted there
        self.keep = keep
        self.scratch = scratch
        self.active: int | None = None
        self.flat: torch.Tensor | None = None  # the active tensor's storage, for real
        self.aside: set[int] = set()  # positions whose wanted parts are kept
        self.kept: dict[str, torch.Tensor] = {}

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors = [t for t in arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor)]
        positions = {id(t): p for t in tensors if (p := self.position(t)) is not None}
        if not positions:
            return func(*args, **kwargs)
        schema = func._schema
        written = written_args(schema, args, kwargs)
        aliasing = [r for r in schema.returns if r.alias_info is not None]
        if (not written and aliasing) or func in METADATA:
            return func(*args, **kwargs)  # a view or a new tensor: no data is read
        if func.overloadpacket in _RESTRIDE:
            raise Fallback(f"{func} changes the memory a tensor of the layer views")
        target = self._target(written, positions, len(schema.returns))
        for t in tensors:
            p = positions.get(id(t))
            if p is not None and t is not target and p in self.aside:
                raise Fallback(f"{func} reads a tensor of the layer that was set aside")
        if target is not None:
            self._activate(func, target, positions[id(target)], positions)
        if self.active in positions.values():
            args, kwargs = tree_map_only(torch.Tensor, self._redirect, (args, kwargs))
        out = func(*args, **kwargs)
        if target is not None and aliasing:
            return target  # the layer's own tensor, not the stand-in
        return out

    def _target(
        self, written: list[Any], positions: dict[int, int], returns: int
    ) -> torch.Tensor | None:
        """The one tensor of the layer the operation writes, if any."""
        mine = []
        for value in written:
            if not isinstance(value, torch.Tensor):
                if any(id(t) in positions for t in value if isinstance(t, torch.Tensor)):
                    raise Fallback("an operation writes a list of the layer's tensors")
            elif id(value) in positions:
                mine.append(value)
        if not mine:
            return None
        if len({positions[id(t)] for t in mine}) > 1 or returns > 1:
            raise Fallback("an operation writes several tensors of the layer")
        return mine[0]

    def _activate(
        self, func: Any, target: torch.Tensor, position: int, positions: dict[int, int]
    ) -> None:
        """Make ``position`` the active tensor, setting the previous one aside."""
        if position == self.active:
            return
        if self.active is not None and self.active in positions.values():
            raise Fallback(f"{func} writes one tensor of the layer and reads another")
        overwrites = (func in _OVERWRITE or RANDOM in func.tags) and _covers(target)
        if position in self.aside and not overwrites:
            raise Fallback(f"{func} changes part of a tensor of the layer set aside")
        self._set_aside()
        registered = self.seen[position]
        storage = registered.untyped_storage()
        count, rest = divmod(storage.nbytes(), registered.element_size())
        if rest:
            raise Fallback("a storage that is not a whole number of elements")
        flat = self.scratch.take(count, registered.dtype, registered.device)
        if not overwrites:  # its values so far (set when it was made, before registration)
            flat.copy_(flat.new_empty(0).set_(storage))
        self.aside.discard(position)
        self.active, self.flat = position, flat

    def _redirect(self, t: torch.Tensor) -> torch.Tensor:
        if self.flat is None or self.position(t) != self.active:
            return t
        if t.dtype != self.flat.dtype:
            raise Fallback("a view of a tensor of the layer in another dtype")
        return self.flat.as_strided(t.size(), t.stride(), t.storage_offset())

    def _set_aside(self) -> None:
        """Keep the wanted part of the active tensor; free its stand-in."""
        if self.active is None or self.flat is None:
            return
        registered = self.seen[self.active]
        value = self.flat.as_strided(
            registered.size(), registered.stride(), registered.storage_offset()
        )
        names = self.wanted.get(self.active, [])
        kept = self.scratch.give_back(self.flat, [self.keep(name, value) for name in names])
        self.kept.update(zip(names, kept, strict=True))
        self.aside.add(self.active)
        self.active = self.flat = None

    def finish(self, module: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
        """The kept part of each of ``names`` once the initialization is over: tensors
        the initialization never wrote keep the values they were made with."""
        self._set_aside()
        tensors = named_tensors(module)
        values = []
        for name in names:
            t = tensors[name]
            position = self.position(t)
            if position is not None and position in self.aside:
                if name not in self.kept or _geometry(t) != _geometry(self.seen[position]):
                    raise Fallback(f"{name} is not the tensor registered at its place")
                values.append(self.kept.pop(name))
            else:
                values.append(self.keep(name, t.detach()))
        return values


def once(
    make: Callable[[], nn.Module],
    names: Sequence[str],
    order: dict[str, int],
    device: torch.device,
    keep: Keep,
    streams: Callable[[list[torch.Tensor]], Any] | None = None,
    scratch: Scratch | None = None,
) -> list[torch.Tensor]:
    """The kept part of each of ``names`` (in order) of the module ``make`` builds
    and initializes on ``device``, in one run; :class:`Fallback` where the run
    cannot be followed. ``order`` is each name's registration position (from a dry
    run on meta). ``streams``, given the registrations list, makes a dispatch mode
    that runs above (``seed=``: each tensor's draws from its own generator).
    ``scratch`` lends the stand-ins' memory (default: a new one for this run).

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> want = nn.Linear(3, 4).weight.detach()
    >>> _ = torch.manual_seed(0)
    >>> rows = once(lambda: nn.Linear(3, 4), ["weight"], {"weight": 0, "bias": 1},
    ...             torch.device("cpu"), lambda name, full: full[:2].clone())
    >>> torch.equal(rows[0], want[:2])
    True
    """
    wanted: dict[int, list[str]] = {}
    for name in names:
        wanted.setdefault(order[name], []).append(name)
    with registrations() as seen, torch.device(device):
        mode = _Once(seen, wanted, keep, scratch if scratch is not None else Scratch())
        with mode:
            if streams is None:
                module = make()
            else:
                with streams(seen):
                    module = make()
        return mode.finish(module, names)
