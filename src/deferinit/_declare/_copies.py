"""Deep copies of an unbuilt layer start out equal, as eager's copies do.

Eager ``nn.TransformerEncoder(layer, 6)`` constructs ``layer`` once and deep-copies
it six times: the six layers start with the same values, drawn once. A twin's
copies are built later, each on its own, and would each draw their own. So the
first deep copy of an unbuilt twin (the twin itself copied, as torch's clones and
``[copy.deepcopy(layer) for _ in range(n)]`` do; a model holding unbuilt twins
copies into another model, built on its own) gives it and every copy (the copies
of copies too) one :class:`Copies` record, shared, never copied itself. The first of them
constructed for real notes its device's default generator state before it draws
from it; each other one is constructed drawing from a private generator set to
that state (:class:`~deferinit._random.Drawing`), so the copies hold the same
values and the default generator ends where one construction leaves it, as
eager's, without ever being set or put back (other threads may draw from it).

Only the construction is shared: an initializer registered with ``di.initialize``
runs on each copy after it, drawing anew, as eager ``net.apply(init)`` does on
each layer of the stack. A copy built again in a later operation (after
``di.reset``, or a ``di.materialize`` after a build on meta) draws anew, and so do
the copies built after it; a copy constructed twice within one operation (a
sharded ``di.materialize`` replays a layer) gets the same values both times.
Operations are counted by :func:`next_operation`.

>>> import copy, torch
>>> from deferinit import nn as dnn
>>> layer = dnn.Linear(3)
>>> a, b = copy.deepcopy(layer), copy.deepcopy(layer)
>>> _, _ = a(torch.randn(1, 2)), b(torch.randn(1, 2))
>>> torch.equal(a.weight, b.weight)
True
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._random import Drawing, default_generator

__all__ = ["Copies", "constructed_as_copy", "next_operation"]

_OPERATIONS = itertools.count(1)
_operation = 0  # the operation under way (a build, a materialize)


def next_operation() -> None:
    """A new build or materialize begins: a copy constructed again from now on
    draws anew (the first of its copies to do so)."""
    global _operation
    _operation = next(_OPERATIONS)


class _Drawn:
    """One construction the copies share: the default generator's state before it,
    the copy that drew it, the copies constructed from it, and the operation it
    belongs to."""

    __slots__ = ("drawer", "members", "operation", "state")

    def __init__(self, state: torch.Tensor, drawer: nn.Module) -> None:
        self.state = state
        self.drawer = weakref.ref(drawer)
        self.members: weakref.WeakSet[nn.Module] = weakref.WeakSet([drawer])
        self.operation = _operation


class Copies:
    """What the deep copies of one unbuilt layer share: by the sizes they are built
    with, the construction their values come from. Copying or pickling it gives
    itself (copies made together stay together), or a fresh one."""

    __slots__ = ("drawn", "__weakref__")

    def __init__(self) -> None:
        self.drawn: dict[Hashable, _Drawn] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Copies:
        return self

    def __reduce__(self) -> tuple[type[Copies], tuple[()]]:
        return (Copies, ())


@contextlib.contextmanager
def constructed_as_copy(
    module: nn.Module, values: Mapping[str, Any], device: torch.device
) -> Iterator[None]:
    """Run ``module``'s real construction with ``values`` on ``device`` inside:
    where ``module`` is one of several copies and another was constructed with the
    same sizes, drawing from a private generator set to the state that one started
    from. Nothing for a layer never copied, on meta (which draws nothing), or on a
    device without a default generator deferinit knows (neither CPU nor CUDA)."""
    copies = module.__dict__["_di"].copies
    if copies is None or device.type == "meta":
        yield
        return
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    default = default_generator(device)
    try:
        key: Hashable = (tuple(sorted(values.items())), str(device))
        drawn = copies.drawn.get(key)
    except TypeError:  # sizes that do not hash: each copy draws its own
        drawn, default = None, None
    if default is None:
        yield
        return
    if drawn is None or (module in drawn.members and drawn.operation != _operation):
        copies.drawn[key] = _Drawn(default.get_state(), module)  # this one draws
        yield
        return
    if drawn.drawer() is module:  # the draw again, from where its caller put it
        yield
        return
    drawn.members.add(module)
    private = torch.Generator(device)
    private.set_state(drawn.state)
    drawing = Drawing(0)
    drawing.generators[device] = private
    with drawing:
        yield
