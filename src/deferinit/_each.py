"""Initialize one tensor of a layer at a time, with the values the whole layer's
initialization would give it.

A layer's constructor (or ``reset_parameters``) initializes all of its tensors
together. To hand out one tensor's full value while touching memory only for that
tensor (FSDP2 shards: each rank keeps a slice of every parameter), the
initialization is run once per group of wanted tensors under :class:`_Mirror`, a
dispatch mode in which

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
largest tensor of the layer) plus one throw-away fill. Whatever the mode cannot
follow (a value read from another tensor of the layer, a tensor subclass) raises
:class:`_Fallback`, and that group is initialized with the whole layer instead:
more memory, never different values.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

__all__ = [
    "Generators",
    "each_tensor",
    "named_tensors",
    "seeded_whole",
    "storage_key",
    "written_storages",
]

aten = torch.ops.aten

_RANDOM = torch.Tag.nondeterministic_seeded
# Operations that read only a tensor's size, strides, dtype and device.
_METADATA = {
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


class _Fallback(BaseException):  # noqa: N818 - a signal, not an error
    """The mirror cannot follow this initialization; use a whole layer instead.
    A ``BaseException``, so that an ``except Exception`` in initialization code
    cannot swallow it."""


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by qualified name (tied ones under each name)."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    return dict(named)


def _key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


storage_key = _key


class _Mode(TorchDispatchMode):
    """A dispatch mode whose subclasses say what to do with one operator call."""

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return self.handle(func, args, kwargs or {})


class _Writes(_Mode):
    def __init__(self, written: set[int]) -> None:
        super().__init__()
        self.written = written

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for value in _written(func._schema, args, kwargs):
            for tensor in value if isinstance(value, list | tuple) else [value]:
                if isinstance(tensor, torch.Tensor):
                    self.written.add(_key(tensor))
        return func(*args, **kwargs)


@contextlib.contextmanager
def written_storages() -> Iterator[set[int]]:
    """The storages (:func:`storage_key`) every operation inside writes to.

    >>> import torch
    >>> a, b = torch.empty(2), torch.empty(2)
    >>> with written_storages() as written:
    ...     _ = a.fill_(1.0)
    >>> storage_key(a) in written, storage_key(b) in written
    (True, False)
    """
    written: set[int] = set()
    with _Writes(written):
        yield written


@contextlib.contextmanager
def _registrations() -> Iterator[list[torch.Tensor]]:
    """Every parameter and buffer registered on any module by this thread, in order
    (torch's registration hooks are global: other threads' modules are not ours)."""
    seen: list[torch.Tensor] = []
    thread = threading.get_ident()

    def hook(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and threading.get_ident() == thread:
            seen.append(tensor)

    handles = [
        torch_module.register_module_parameter_registration_hook(hook),
        torch_module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _order(make: Callable[[], nn.Module], generators: Generators) -> dict[str, int] | None:
    """Qualified name -> position of its first registration, from a dry run on meta
    (meta tensors neither allocate nor draw random numbers; whatever the code draws
    elsewhere is given back). ``None`` where the dry run fails, e.g. initialization
    code that reads a value (``.item()``): then whole layers only."""
    try:
        with _registrations() as seen, torch.device("meta"):
            module = make()
    except Exception:
        return None
    finally:
        generators.restore()
    position: dict[int, int] = {}
    for i, t in enumerate(seen):
        position.setdefault(id(t), i)
    return {n: position[id(t)] for n, t in named_tensors(module).items() if id(t) in position}


def _sizes(
    make: Callable[[], nn.Module], names: Sequence[str], generators: Generators
) -> dict[str, int] | None:
    try:
        with torch.device("meta"):
            shapes = named_tensors(make())
    except Exception:
        return None
    finally:
        generators.restore()
    return {n: shapes[n].numel() * shapes[n].element_size() for n in names if n in shapes}


class Generators:
    """The random generators initialization code may draw from: torch's CPU one,
    the target device's, and Python's ``random``; saved, restored and seeded
    together."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.python = random.getstate()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        random.setstate(self.python)

    def seed(self, seed: int) -> None:
        """Seed the CPU and target-device generators only (``torch.manual_seed``
        would reseed every device's)."""
        self.restore()
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)


class _Registered(_Mode):
    """A dispatch mode that knows which registered tensor a tensor's storage is."""

    def __init__(self, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = seen  # registrations so far, in order (filled by the hooks)
        self.indexed = 0
        self.positions: dict[int, int] = {}  # storage -> first registration position

    def position(self, t: torch.Tensor) -> int | None:
        """The registration position of ``t``'s storage, if the layer registered it."""
        if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):
            raise _Fallback(f"tensor subclass {type(t).__name__}")
        for i in range(self.indexed, len(self.seen)):
            self.positions.setdefault(_key(self.seen[i]), i)
        self.indexed = len(self.seen)
        return self.positions.get(_key(t))


class _Mirror(_Registered):
    """Runs an initialization for real, except on the layer's tensors other than the
    wanted one: their random fills go to a throw-away tensor, their other writes
    are skipped, and reading their values gives up (:class:`_Fallback`)."""

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
        written = _written(schema, args, kwargs)
        aliasing = [r for r in schema.returns if r.alias_info is not None]
        if (not written and aliasing) or func in _METADATA:
            return func(*args, **kwargs)  # a view or a new tensor: no data is read
        if not written or any(id(w) not in others for w in written):
            raise _Fallback(f"{func} reads the value of another tensor of the layer")
        if len(written) != 1 or len(schema.returns) > 1:
            raise _Fallback(f"{func} writes several tensors")
        # A write to another tensor: its value does not matter, the generator does.
        (target,) = written
        if self.replay and _RANDOM in func.tags:
            scratch = torch.empty_strided(
                target.size(), target.stride(), dtype=target.dtype, device=target.device
            )
            func(*_swap(args, target, scratch), **_swap(kwargs, target, scratch))
            del scratch
        return target if aliasing else None


def _written(schema: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments an operator call writes to (its schema's mutable aliases)."""
    bound = [*zip(schema.arguments, args, strict=False)]
    bound += [(spec, kwargs[spec.name]) for spec in schema.arguments if spec.name in kwargs]
    return [v for spec, v in bound if spec.alias_info is not None and spec.alias_info.is_write]


def _swap(tree: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    return tree_map_only(torch.Tensor, lambda t: new if t is old else t, tree)


def _mirrored(
    make: Callable[[], nn.Module],
    names: Sequence[str],
    wanted: set[int],
    device: torch.device,
    replay: bool,
) -> list[torch.Tensor]:
    with _registrations() as seen, torch.device(device), _Mirror(wanted, seen, replay):
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


class _Streams(_Registered):
    """Every random fill of a registered tensor draws from that tensor's own
    generator (seeded from its name on its first fill), as if it were initialized
    alone; any other random operation gives up (:class:`_Fallback`)."""

    def __init__(
        self, seen: list[torch.Tensor], names: dict[int, str], seeds: Callable[[str], int]
    ) -> None:
        super().__init__(seen)
        self.names = names  # registration position -> qualified name
        self.seeds = seeds
        self.states: dict[int, torch.Tensor] = {}  # position -> its generator state

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _RANDOM not in func.tags:
            return func(*args, **kwargs)
        written = _written(func._schema, args, kwargs)
        if len(written) != 1:
            raise _Fallback(f"{func} is not a fill of one tensor")
        position = self.position(written[0])
        if position is None or position not in self.names:
            raise _Fallback(f"{func} fills a tensor the layer does not register")
        outer = torch.get_rng_state()
        state = self.states.get(position)
        if state is None:
            torch.default_generator.manual_seed(self.seeds(self.names[position]))
        else:
            torch.set_rng_state(state)
        try:
            return func(*args, **kwargs)
        finally:
            self.states[position] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seeded_whole(
    make: Callable[[], nn.Module], device: torch.device, seeds: Callable[[str], int]
) -> nn.Module | None:
    """The module ``make`` builds on ``device``, each of its tensors holding what
    :func:`each_tensor` with ``seeds`` gives it, in one run; ``None`` where the
    initialization fills something else at random (then go tensor by tensor).
    CPU only: elsewhere ``None``.

    >>> import torch
    >>> from torch import nn
    >>> seeds = {"weight": 1, "bias": 2}.__getitem__
    >>> whole = seeded_whole(lambda: nn.Linear(3, 2), torch.device("cpu"), seeds)
    >>> alone = dict(each_tensor(lambda: nn.Linear(3, 2), ["bias"], torch.device("cpu"), seeds))
    >>> torch.equal(whole.bias, alone["bias"])
    True
    """
    if device.type != "cpu":
        return None
    generators = Generators(device)
    order = _order(make, generators)
    if order is None:
        return None
    names: dict[int, str] = {}
    for name, position in order.items():
        names.setdefault(position, name)
    try:
        with _registrations() as seen, torch.device(device), _Streams(seen, names, seeds):
            return make()
    except _Fallback:
        return None
    finally:
        generators.restore()


def each_tensor(
    make: Callable[[], nn.Module],
    names: Sequence[str],
    device: torch.device,
    seeds: Callable[[str], int] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full value)`` for each wanted tensor of the module ``make``
    creates and initializes, a few at a time (never more bytes at once than the
    largest of them).

    Without ``seeds`` every value is what one run of ``make`` from the current
    generator state gives, and the generators (torch's CPU and target device's,
    Python's ``random``) end where that run leaves them. With ``seeds`` the tensor
    ``name`` is initialized alone, its draws from a generator seeded with
    ``seeds(name)`` (the same values :func:`seeded_whole` gives); where its value
    needs the layer's other tensors, from one run of the layer (per-tensor streams,
    else the stream ``seeds("")``). The caller's generators are left alone.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> want = nn.Linear(3, 2).weight.detach()
    >>> _ = torch.manual_seed(0)
    >>> [(n, torch.equal(v, want)) for n, v in each_tensor(
    ...     lambda: nn.Linear(3, 2), ["weight"], torch.device("cpu"))]
    [('weight', True)]
    """
    generators = Generators(device)
    order = _order(make, generators)
    sizes = None if seeds is not None or order is None else _sizes(make, names, generators)
    if sizes is not None and len(sizes) == len(names):
        groups = _groups(names, sizes)
    elif seeds is None and order is None:
        groups = [list(names)]  # one whole layer gives them all
    else:
        groups = [[name] for name in names]
    # seed=: where the mirror cannot follow a tensor, the layer runs once, with a
    # stream per tensor if it can (seeded_whole), else with the layer's own stream
    # (seeds("")): its tensors keep whatever relations their initialization makes.
    layer: list[nn.Module] = []

    def rewind(name: str) -> None:
        if seeds is None:
            generators.restore()
        else:
            generators.seed(seeds(name))

    def whole(group: list[str]) -> list[torch.Tensor]:
        if seeds is None:
            rewind(group[0])
            with torch.device(device):
                tensors = named_tensors(make())
            return [tensors[name] for name in group]
        if not layer:
            module = seeded_whole(make, device, seeds)
            if module is None:
                rewind("")
                with torch.device(device):
                    module = make()
            layer.append(module)
        tensors = named_tensors(layer[0])
        return [tensors[name] for name in group]

    try:
        for group in groups:
            rewind(group[0])
            try:
                if order is None:
                    raise _Fallback("no dry run")
                wanted = {order[name] for name in group}
                values = _mirrored(make, group, wanted, device, replay=seeds is None)
            except (_Fallback, KeyError):
                values = whole(group)
            for name in group:
                yield name, values.pop(0)
            del values
        if not names and seeds is None:
            rewind("")
            with torch.device(device):
                make()  # the generators advance as one initialization would
    finally:
        layer.clear()
        if seeds is not None:
            generators.restore()
