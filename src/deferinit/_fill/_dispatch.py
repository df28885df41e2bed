"""What the one-tensor-at-a-time machinery stands on: dispatch modes that know
which registered tensor an operation touches and which arguments it writes, and the
registration order of a layer's tensors (from a dry run on meta, which draws from no
process-wide generator). The private generators it draws from are in
:mod:`deferinit._random`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .._random import RANDOM, Drawing, Generators, Mode, _device_of, _with_generator

__all__ = [
    "IN_WORKER",
    "Fallback",
    "RegisteredStorageMode",
    "dry_run",
    "hooks_installed",
    "lends_default",
    "named_tensors",
    "registration_order",
    "registrations",
    "saved_generators",
    "storage_key",
    "written_args",
    "written_storages",
]


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


class _Hooks:
    """torch's global registration hooks, installed while any thread records
    registrations: counted, so that worker threads filling layers at the same time
    (``seed=``) never add or remove a hook while another thread's module is running
    the hooks (a dictionary changing size during iteration)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.handles: list[Any] = []
        self.local = threading.local()  # .lists: this thread's open recordings

    def record(self, module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            for seen in getattr(self.local, "lists", ()):
                seen.append(tensor)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.handles = [
                    torch_module.register_module_parameter_registration_hook(self.record),
                    torch_module.register_module_buffer_registration_hook(self.record),
                ]
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    for handle in self.handles:
                        handle.remove()
                    self.handles = []


_HOOKS = _Hooks()

# Held by a thread that starts workers: the hooks stay installed until it is done.
hooks_installed = _HOOKS.installed


@contextlib.contextmanager
def registrations() -> Iterator[list[torch.Tensor]]:
    """Every parameter and buffer registered on any module by this thread, in order
    (torch's registration hooks are global: other threads' modules are not ours)."""
    seen: list[torch.Tensor] = []
    lists: list[list[torch.Tensor]] = getattr(_HOOKS.local, "lists", [])
    _HOOKS.local.lists = [*lists, seen]
    try:
        with _HOOKS.installed():
            yield seen
    finally:
        _HOOKS.local.lists = lists


class _LeftAlone(Generators):
    """In a worker thread the process-wide generators are neither saved nor
    restored: another worker may be lending the default one to a draw
    (:func:`deferinit._random.draw`), and what a worker runs draws only from
    private generators."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def restore(self) -> None:
        pass


# Set in the worker threads of a parallel seed= materialize.
IN_WORKER: ContextVar[bool] = ContextVar("deferinit_fill_worker", default=False)


def saved_generators(device: torch.device) -> Generators:
    """The random generators as they are now, to put back where initialization
    without ``seed=`` runs again from them (in a worker thread: left alone, see
    :class:`_LeftAlone`)."""
    return _LeftAlone(device) if IN_WORKER.get() else Generators(device)


def lends_default(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the random operator ``func`` can draw only from its device's default
    generator (no overload takes a ``generator``: ``aten.native_dropout``), which
    :func:`deferinit._random.draw` then lends it, setting the process-wide
    generator's state while other threads may draw from it."""
    return kwargs.get("generator") is None and _with_generator(func) is None


class _DrawsAside(Drawing):
    """A dry run's random operations: on meta nothing is drawn; on a real tensor
    (construction code naming its device) the draw comes from a throw-away
    generator, never a process-wide one, so nothing needs putting back; an operator
    that can draw only from the default generator gives up before drawing (the dry
    run fails)."""

    def __init__(self) -> None:
        super().__init__(0)

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if RANDOM in func.tags and lends_default(func, kwargs):
            if _device_of(args, kwargs).type != "meta":
                raise Fallback(f"{func} draws only from the default generator")
        return super().handle(func, args, kwargs)


def registration_order(make: Callable[[], nn.Module]) -> dict[str, int] | None:
    """Qualified name -> position of its first registration, from a dry run on meta
    (:func:`dry_run`). ``None`` where the dry run fails, e.g. initialization code
    that reads a value (``.item()``): then whole layers only."""
    ran = dry_run(make)
    return None if ran is None else ran[0]


def dry_run(make: Callable[[], nn.Module]) -> tuple[dict[str, int], set[str]] | None:
    """:func:`registration_order`, and every name of a tensor the module holds
    (registered or not); ``None`` where the dry run fails. Meta tensors neither
    allocate nor draw; a draw on a real tensor comes from a throw-away generator
    (:class:`_DrawsAside`): torch's process-wide generators are left alone, not
    saved and put back, so another thread's draws meanwhile stand. What the code
    draws from Python's ``random`` is its own.

    >>> import torch
    >>> from torch import nn
    >>> before = torch.get_rng_state()
    >>> order, names = dry_run(lambda: nn.Linear(3, 2))
    >>> order, sorted(names), torch.equal(torch.get_rng_state(), before)
    ({'weight': 0, 'bias': 1}, ['bias', 'weight'], True)
    """
    try:
        with registrations() as seen, torch.device("meta"), _DrawsAside():
            module = make()
    except (Exception, Fallback):
        return None
    position: dict[int, int] = {}
    for i, t in enumerate(seen):
        position.setdefault(id(t), i)
    tensors = named_tensors(module)
    order = {n: position[id(t)] for n, t in tensors.items() if id(t) in position}
    return order, set(tensors)


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
