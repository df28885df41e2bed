"""What the one-tensor-at-a-time machinery stands on: dispatch modes that know
which registered tensor an operation touches, which arguments it writes, the random
generators initialization code draws from, and the registration order of a
layer's tensors (from a dry run on meta).
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "RANDOM",
    "Fallback",
    "Drawing",
    "Generators",
    "Mode",
    "RegisteredStorageMode",
    "named_tensors",
    "registration_order",
    "registrations",
    "storage_key",
    "draw",
    "written_args",
    "written_storages",
]

RANDOM = torch.Tag.nondeterministic_seeded


class Fallback(BaseException):  # noqa: N818 - a signal, not an error
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


def storage_key(t: torch.Tensor) -> int:
    """Which storage ``t`` views: equal for all views of one storage while it lives."""
    return int(t.untyped_storage()._cdata)


class Mode(TorchDispatchMode):
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


class _Writes(Mode):
    def __init__(self, written: set[int]) -> None:
        super().__init__()
        self.written = written

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for value in written_args(func._schema, args, kwargs):
            for tensor in value if isinstance(value, list | tuple) else [value]:
                if isinstance(tensor, torch.Tensor):
                    self.written.add(storage_key(tensor))
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
def registrations() -> Iterator[list[torch.Tensor]]:
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


def registration_order(
    make: Callable[[], nn.Module], generators: Generators
) -> dict[str, int] | None:
    """Qualified name -> position of its first registration, from a dry run on meta
    (meta tensors neither allocate nor draw random numbers; whatever the code draws
    elsewhere is given back). ``None`` where the dry run fails, e.g. initialization
    code that reads a value (``.item()``): then whole layers only."""
    try:
        with registrations() as seen, torch.device("meta"):
            module = make()
    except Exception:
        return None
    finally:
        generators.restore()
    position: dict[int, int] = {}
    for i, t in enumerate(seen):
        position.setdefault(id(t), i)
    return {n: position[id(t)] for n, t in named_tensors(module).items() if id(t) in position}


class Generators:
    """The random generators initialization code may draw from: torch's CPU one,
    the target device's, and Python's ``random``; saved and restored together."""

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


def _signature(func: Any) -> list[str]:
    return [a.name for a in func._schema.arguments if a.name != "generator"]


_lock = threading.Lock()  # for lending a default generator (no generator argument)


@functools.cache
def _with_generator(func: Any) -> Any:
    """The overload of ``func`` that also takes a ``generator`` (``aten.randn.default``
    -> ``aten.randn.generator``), or ``None``."""
    if any(a.name == "generator" for a in func._schema.arguments):
        return func
    packet = func.overloadpacket
    for name in packet.overloads():
        other = getattr(packet, name)
        takes = any(a.name == "generator" for a in other._schema.arguments)
        if takes and _signature(other) == _signature(func):
            return other
    return None


def draw(
    generator: torch.Generator, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run the random operator ``func`` drawing from ``generator`` instead of its
    device's default generator, which (like every other thread's draws) it leaves
    alone. A generator the code passes itself is kept.

    >>> import torch
    >>> mine = torch.Generator().manual_seed(0)
    >>> before = torch.get_rng_state()
    >>> x = draw(mine, torch.ops.aten.uniform_.default, (torch.empty(2),), {})
    >>> torch.equal(x, torch.empty(2).uniform_(generator=torch.Generator().manual_seed(0)))
    True
    >>> torch.equal(torch.get_rng_state(), before)
    True
    """
    if kwargs.get("generator") is not None:
        return func(*args, **kwargs)
    overload = _with_generator(func)
    if overload is not None:
        return overload(*args, **{**kwargs, "generator": generator})
    # No overload takes a generator (aten.native_dropout): lend it the default one.
    default = _default_generator(generator.device)
    if default is None:
        return func(*args, **kwargs)
    with _lock:
        outer = default.get_state()
        default.set_state(generator.get_state())
        try:
            return func(*args, **kwargs)
        finally:
            generator.set_state(default.get_state())
            default.set_state(outer)


def _default_generator(device: torch.device) -> torch.Generator | None:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return None


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    device = kwargs.get("device")
    return torch.device(device) if device is not None else torch.device("cpu")


class Drawing(Mode):
    """Every random operation inside draws from private generators seeded with
    ``seed`` (one per device), not from the default ones: other threads' draws
    cannot shift its values, and the default generators are left alone.

    >>> import torch
    >>> with Drawing(0):
    ...     a = torch.rand(3)
    >>> torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(0)))
    True
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if RANDOM not in func.tags:
            return func(*args, **kwargs)
        device = _device_of(args, kwargs)
        if device.type == "meta":
            return func(*args, **kwargs)
        generator = self.generators.get(device)
        if generator is None:
            generator = torch.Generator(device).manual_seed(self.seed)
            self.generators[device] = generator
        return draw(generator, func, args, kwargs)


class RegisteredStorageMode(Mode):
    """A dispatch mode that knows which registered tensor a tensor's storage is."""

    def __init__(self, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = seen  # registrations so far, in order (filled by the hooks)
        self.indexed = 0
        self.positions: dict[int, int] = {}  # storage -> first registration position

    def position(self, t: torch.Tensor) -> int | None:
        """The registration position of ``t``'s storage, if the layer registered it."""
        if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):
            raise Fallback(f"tensor subclass {type(t).__name__}")
        for i in range(self.indexed, len(self.seen)):
            self.positions.setdefault(storage_key(self.seen[i]), i)
        self.indexed = len(self.seen)
        return self.positions.get(storage_key(t))


def written_args(schema: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The arguments an operator call writes to (its schema's mutable aliases)."""
    bound = [*zip(schema.arguments, args, strict=False)]
    bound += [(spec, kwargs[spec.name]) for spec in schema.arguments if spec.name in kwargs]
    return [v for spec, v in bound if spec.alias_info is not None and spec.alias_info.is_write]
