"""What the one-tensor-at-a-time machinery stands on: dispatch modes that know
which registered tensor an operation touches and which arguments it writes, and the
registration order of a layer's tensors (from a dry run on meta). The private
generators it draws from are in :mod:`deferinit._random`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .._random import Generators, Mode

__all__ = [
    "Fallback",
    "RegisteredStorageMode",
    "named_tensors",
    "registration_order",
    "registrations",
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
