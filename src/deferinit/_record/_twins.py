"""Deferred layers declared inside a recorded construction, replayed in their place.

While ``deferred_init`` records, a deferred twin (``dnn.Linear(256)``) cannot be
constructed: its sizes are unknown. The record keeps its place instead
(:class:`~._tape.Declared`), and the place of every init call queued on its
placeholders (:class:`~._tape.Queued`). Once ``di.build(model, example,
device="meta")`` or a checkpoint has given the sizes, the exact replay constructs
the layer right there — its own ``__init__`` draws between the draws around it,
as eager construction with every size written out would — and runs each queued
call where it was made. Under ``seed=`` order does not matter, so the twins are
left to ``di.materialize``'s own rebuild (each tensor from its own generator).

>>> import torch
>>> from torch import nn
>>> import deferinit as di
>>> from deferinit import nn as dnn
>>> def mixed() -> nn.Module:
...     return nn.Sequential(nn.Linear(3, 4), dnn.Linear(2))
>>> _ = torch.manual_seed(0)
>>> eager = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
>>> model = di.build(di.deferred_init(mixed), (1, 3), device="meta")
>>> _ = torch.manual_seed(0)
>>> torch.equal(di.materialize(model)[1].weight, eager[1].weight)
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .._become._initialize import apply_registered
from .._declare._deferred import Deferred
from .._declare._pending import run_pending
from .._declare._signature import constructor_call
from .._declare._state import RecordedApply, Registration, declared_defaults
from .._naming import label
from .._shards import is_dtensor
from .._tensors import is_meta, tensors_by_name
from ._errors import RecordError, ReplayError
from ._tape import Applied, Declared, Queued, Record

if TYPE_CHECKING:  # the DTensor stack loads only where a DTensor exists (see _shards)
    from torch.distributed.tensor import DTensor

__all__ = ["TwinReplay", "check_twins", "declared", "twin_tensors"]


def declared(record: Record) -> list[nn.Module]:
    """The deferred layers declared in the recording, in order."""
    return [e.layer for e in record.events() if isinstance(e, Declared)]


def twin_tensors(record: Record) -> list[torch.Tensor]:
    """The meta tensors of the deferred layers declared in ``record`` that the exact
    replay fills (each object once; a tensor the record itself holds is its own)."""
    finals = {id(f.placeholder) for f in record.finals}
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    for layer in declared(record):
        if isinstance(layer, Deferred):
            continue
        for t in tensors_by_name(layer).values():
            if is_meta(t) and id(t) not in finals and id(t) not in seen:
                seen.add(id(t))
                found.append(t)
    return found


def check_twins(root: nn.Module, name: str, record: Record) -> None:
    """Before anything is allocated: every layer declared in the recording has its
    sizes (a deferred one inside the model is refused earlier, by materialize)."""
    inside = {id(m) for m in root.modules()}
    for layer in declared(record):
        if isinstance(layer, Deferred):
            where = "in the model" if id(layer) in inside else "and then dropped from the model"
            raise RecordError(
                f"materialize: the construction recorded at {name or '<root>'!r} declared "
                f"{label(layer)} {where}; it is still deferred, so its sizes are unknown "
                f"and eager construction's draws cannot be replayed in order. Nothing was "
                f"allocated. Fix: give it its sizes (torch.nn instead of deferinit.nn), or "
                f"build the model first with di.build(model, example, device='meta')."
            )


class TwinReplay:
    """Constructs each declared layer at its event, with the sizes it was built with,
    and runs the queued init calls on its fresh tensors; collects what to put under
    which meta object.

    Args:
        device: where the replay constructs.
        names: qualified names of the model's modules, by id (for initializers and
            messages).
    """

    def __init__(self, device: torch.device, names: dict[int, str]) -> None:
        self.device = device
        self.names = names
        self.fresh: dict[int, torch.Tensor] = {}  # placeholder id -> fresh tensor
        self.by_name: dict[tuple[int, str], torch.Tensor] = {}  # (layer id, leaf) -> fresh
        self.places: list[tuple[torch.Tensor, torch.Tensor, str]] = []
        self.sharded: list[tuple[DTensor, torch.Tensor]] = []  # (sharded meta tensor, full)
        self.skip: set[int] = set()  # tensors the record itself fills
        self.modules: dict[int, nn.Module] = {}  # declared layer id -> its fresh module
        self.later: list[tuple[nn.Module, Registration, str]] = []  # see finish()

    def run(self, event: Declared | Queued | Applied) -> None:
        if isinstance(event, Declared):
            self._construct(event.layer)
        elif isinstance(event, Applied):
            self._apply(event)
        else:
            self._call(event)

    def _construct(self, layer: nn.Module) -> None:
        state = layer.__dict__["_di"]
        args, kwargs = constructor_call(state.deferred, state.arguments, state.values)
        name = self.names.get(id(layer), "")
        with declared_defaults(state, self.device):
            if "device" in kwargs:
                kwargs["device"] = self.device
            fresh: nn.Module = state.deferred._di_cls(*args, **kwargs)
            registered = state.init
            if registered is not None and registered.init is not None:
                here = Registration(registered.init, registered.prefix)
                apply_registered(fresh, here, recurse=True, name=name)
        self.modules[id(layer)] = fresh
        if registered is not None:
            # Applied inside the recording: their own events run them. Applied after
            # it (model.apply(fn) before materialize): after the whole construction.
            later = tuple(fn for fn in registered.then if not isinstance(fn, RecordedApply))
            if later:
                self.later.append((fresh, Registration(None, "", later), name))
        new = tensors_by_name(fresh)
        for leaf, old in tensors_by_name(layer).items():
            value = new.get(leaf)
            if value is None:
                raise ReplayError(
                    f"materialize: {label(layer)} has tensor {leaf!r}, which constructing "
                    f"it again did not make. The model was left on meta. Fix: do not add "
                    f"tensors to a deferred layer after its declaration."
                )
            self.fresh[id(old)] = value
            self.by_name[(id(layer), leaf)] = value
            if is_dtensor(old):
                if is_meta(old):  # FSDP2 / tensor parallel: this rank keeps its slice
                    self.sharded.append((old, value))
            elif is_meta(old) and id(old) not in self.skip:
                self.places.append((old, value, f"{name + '.' if name else ''}{leaf}"))

    def finish(self) -> None:
        """After the whole construction: the functions applied to the declared layers
        once the recording had ended, as eager ``model = factory(); model.apply(fn)``."""
        for fresh, registered, name in self.later:
            apply_registered(fresh, registered, recurse=True, name=name)
        self.later.clear()

    def _apply(self, event: Applied) -> None:
        fresh = self.modules.get(id(event.layer))
        if fresh is None:
            raise ReplayError(
                "materialize: a function was applied to a deferred layer that the replay "
                "did not construct. The model was left on meta. Fix: apply it to a layer "
                "declared inside the deferred_init factory."
            )
        name = self.names.get(id(event.layer), "")
        # Tensors tied (before the build) to a tensor of the recording: the function
        # changes the fresh one, which is not placed; eager's changed the tied tensor.
        fresh_tensors = tensors_by_name(fresh)
        tied = {
            leaf: fresh_tensors[leaf]._version
            for leaf, old in tensors_by_name(event.layer).items()
            if id(old) in self.skip and leaf in fresh_tensors
        }
        apply_registered(fresh, Registration(None, "", (event.fn,)), recurse=True, name=name)
        changed = [
            leaf for leaf, version in tied.items() if fresh_tensors[leaf]._version != version
        ]
        if changed:
            raise ReplayError(
                f"materialize: {label(event.layer)}: a function applied to it inside the "
                f"recorded construction changes {', '.join(repr(c) for c in changed)}, which "
                f"is tied to another tensor of the recording (assigned before its build); "
                f"the replay cannot apply it to the tied tensor in program order yet, and "
                f"would lose it. The model was left on meta. Fix: tie after applying the "
                f"function, or apply it to the module that owns the tensor, or give the "
                f"layer its sizes (torch.nn instead of deferinit.nn)."
            )

    def _call(self, event: Queued) -> None:
        value = self.by_name.get(
            (id(event.layer), event.leaf), self.fresh.get(id(event.placeholder))
        )
        if value is None:
            raise ReplayError(
                "materialize: an init call was queued on a deferred layer's tensor that "
                "the replay did not construct. The model was left on meta. Fix: make "
                "the call on a layer declared inside the deferred_init factory."
            )
        run_pending([event.call], {**self.fresh, id(event.placeholder): value})
