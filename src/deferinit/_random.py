"""Random operators drawing from private generators, never the default ones.

Several stages need this: the shape-only pass (a forward that draws on real CPU
tensors must not shift other threads' streams), ``seed=`` in materialize (a
generator per tensor), and the dispatch modes built on :class:`Mode`. A dispatch
mode is per thread, so other threads never reach a private generator.
"""

from __future__ import annotations

import functools
import random
import threading
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["RANDOM", "Drawing", "Generators", "Mode", "default_generator", "draw"]

RANDOM = torch.Tag.nondeterministic_seeded


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
    default = default_generator(generator.device)
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


def default_generator(device: torch.device) -> torch.Generator | None:
    """The process-wide default generator of ``device`` (CPU or CUDA), else None."""
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
