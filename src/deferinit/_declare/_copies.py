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

Init calls queued on the layer's placeholders before it was copied
(``nn.init.normal_(layer.weight)``, then the clones) are part of what the copies
share: eager ran them once, on the layer copied, so each copy runs the calls the
first one ran (by their place in program order) from the same private generator,
right after its construction. Calls queued on one copy only, after the copying,
draw from the default generator, as eager's did. An initializer registered with
``di.initialize`` runs on each copy after it, drawing anew, as eager
``net.apply(init)`` does on each layer of the stack. A copy built again in a later operation (after
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
from ._pending import Call, run_pending

__all__ = ["CopyDraw", "Copies", "constructed_as_copy", "copy_draw", "next_operation"]

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

    __slots__ = ("calls", "drawer", "members", "operation", "state")

    def __init__(self, state: torch.Tensor, drawer: nn.Module) -> None:
        self.state = state
        self.drawer = weakref.ref(drawer)
        self.members: weakref.WeakSet[nn.Module] = weakref.WeakSet([drawer])
        self.operation = _operation
        self.calls: frozenset[int] = frozenset()  # program-order numbers of its queued calls


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


class CopyDraw:
    """How one copy is constructed and runs its queued init calls: the first of the
    copies (``private`` is ``None``) draws from the default generator and notes the
    calls it ran; any other draws its construction, and the calls the first one ran,
    from ``private``, set to the state the first one started from."""

    __slots__ = ("drawn", "private")

    def __init__(self, drawn: _Drawn, private: torch.Generator | None) -> None:
        self.drawn = drawn
        self.private = private

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        """Inside: this copy's draws come from its private generator, if it has one."""
        if self.private is None:
            yield
            return
        drawing = Drawing(0)
        drawing.generators[self.private.device] = self.private
        with drawing:
            yield

    def run(self, calls: list[Call], swap: Mapping[int, torch.Tensor] | None = None) -> None:
        """:func:`~deferinit._declare._pending.run_pending` for this copy's queued
        calls: the ones the copies share as their first one ran them, the rest (this
        copy's own) from the default generator after them."""
        if self.private is None:
            self.drawn.calls = frozenset(call[0] for call in calls)
            run_pending(calls, swap)
            return
        shared = [call for call in calls if call[0] in self.drawn.calls]
        with self.drawing():
            run_pending(shared, swap)
        run_pending([call for call in calls if call[0] not in self.drawn.calls], swap)


def copy_draw(
    module: nn.Module, values: Mapping[str, Any], device: torch.device
) -> CopyDraw | None:
    """How ``module``'s real construction with ``values`` on ``device`` draws:
    ``None`` for a layer never copied, on meta (which draws nothing), or on a device
    without a default generator deferinit knows (neither CPU nor CUDA); else where
    it is one of several copies, as the first of them constructed with the same
    sizes, or from a private generator set to the state that one started from."""
    copies = module.__dict__["_di"].copies
    if copies is None or device.type == "meta":
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    default = default_generator(device)
    if default is None:
        return None
    try:
        key: Hashable = (tuple(sorted(values.items())), str(device))
        drawn = copies.drawn.get(key)
    except TypeError:  # sizes that do not hash: each copy draws its own
        return None
    if drawn is None or (module in drawn.members and drawn.operation != _operation):
        drawn = copies.drawn[key] = _Drawn(default.get_state(), module)  # this one draws
        return CopyDraw(drawn, None)
    if drawn.drawer() is module:  # the draw again, from where its caller put it
        return CopyDraw(drawn, None)
    drawn.members.add(module)
    private = torch.Generator(device)
    private.set_state(drawn.state)
    return CopyDraw(drawn, private)


@contextlib.contextmanager
def constructed_as_copy(
    module: nn.Module, values: Mapping[str, Any], device: torch.device
) -> Iterator[CopyDraw | None]:
    """Run ``module``'s real construction with ``values`` on ``device`` inside (see
    :func:`copy_draw`); gives the :class:`CopyDraw` whose :meth:`~CopyDraw.run`
    runs the copy's queued init calls next, or ``None``."""
    draw = copy_draw(module, values, device)
    if draw is None:
        yield None
        return
    with draw.drawing():
        yield draw
