"""Values read while a construction is recorded (``.item()``, ``bool(t)``, ``.tolist()``).

Fake tensors hold no values, so a read is answered by running, on the CPU and
now, only the recorded operations the value depends on:

- A value from literals and deterministic operations (``torch.tensor(2.0)``,
  ``torch.arange(4).sum()``, ``nn.init.trunc_normal_``'s
  ``tensor.new_tensor(a, device="cpu").item()``) is exact: answered, nothing kept.
- A value steered by random numbers (``trunc_normal_``'s rejection loop
  ``if not mask.any()``) is *simulated*: a private generator starts from the
  default generator's state when ``deferred_init`` began (reading a state draws
  nothing) and replays every earlier draw in order (on scratch tensors, one at a
  time), so the answer is exactly eager's when ``materialize`` runs under that same
  state, the usual order: ``torch.manual_seed(s)``, ``deferred_init``,
  ``materialize``. The read is recorded as a *guard*: replay computes it again and
  raises a :class:`ReplayError` (model left on meta) if it differs, since eager
  construction would then take another path. Never silently different.
- If the simulation is impossible (a draw larger than ``SIMULATION_LIMIT`` bytes
  before the read, an explicit user generator, a non-CPU default device), the read
  raises :class:`ValueReadError` naming the operation and the module.

When ``materialize`` runs under another state, the replay records the construction
again from that state first (``_replay``), so the guards hold whenever eager
construction would take the recorded path. A reseed recorded in the construction
(``Reseed``) sets the private generator as it sets the default one at replay. A
deferred layer declared before the read draws at replay but has no sizes at
``deferred_init``: ``materialize`` records again with its sizes (then known), and the
simulation constructs it (and runs init calls queued on it) at its place.

>>> import torch
>>> from deferinit._record import deferred_init
>>> from torch import nn
>>> class Scaled(nn.Module):
...     def __init__(self) -> None:
...         super().__init__()
...         self.k = int(torch.arange(4).sum().item())  # known at record time
...         self.w = nn.Parameter(torch.full((2,), float(self.k)))
>>> deferred_init(Scaled).k
6
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._random import Drawing
from ._engine import Engine
from ._errors import ValueReadError
from ._tape import Applied, Declared, Op, Points, Queued, Record, Reseed, TensorRef, map_refs
from ._twins import TwinReplay

__all__ = ["SIMULATION_LIMIT", "Values"]

SIMULATION_LIMIT = 1 << 30  # bytes of one earlier draw replayed to reach a random read


def _ancestry(ops: Sequence[Op], wanted: set[int]) -> list[int]:
    """Indices (in program order) of the operations the current contents of
    ``wanted`` depend on: those writing a needed storage, transitively."""
    needed = set(wanted)
    chosen: list[int] = []
    for index in range(len(ops) - 1, -1, -1):
        op = ops[index]
        made = op.writes | {sid for sid, _ in op.creates}
        if made & needed:
            chosen.append(index)
            needed |= op.reads
    chosen.reverse()
    return chosen


class Values:
    """Answers value reads for one recording.

    Args:
        record: the record being written (read, never changed here).
    """

    def __init__(self, record: Record, twins: Sequence[Declared | Queued | Applied] = ()) -> None:
        self.record = record
        # Recording again at materialize: the deferred layers declared (sizes known
        # now) and their queued init calls, in order, to draw as the replay will.
        self.twins = list(twins)
        self.twin_replay = TwinReplay(torch.device("cpu"), {})
        self.generator = torch.Generator()
        if record.start_state is not None:
            self.generator.set_state(record.start_state)
        self.points = Points(self.generator)
        self.states: dict[int, torch.Tensor] = {}  # random op index -> state before it
        self.passed = 0  # every random op below this index has its state in self.states

    def read(self, refs: Sequence[TensorRef], what: str) -> tuple[list[torch.Tensor], bool]:
        """CPU values of ``refs`` as eager construction has them now, and whether they
        depend on random numbers (then they are a simulation, to be guarded)."""
        ops = self.record.ops
        chosen = _ancestry(ops, {r.storage for r in refs})
        drawn = [i for i in chosen if ops[i].random]
        if drawn:
            self._advance(drawn[-1] + 1, what)
        cpu = torch.device("cpu")
        engine = Engine(cpu, cpu, dict(self.record.externals), generator=torch.Generator())
        with torch.no_grad():
            for index in chosen:
                if ops[index].random:
                    assert engine.generator is not None
                    engine.generator.set_state(self.states[index])
                engine.run(ops[index])
            return [engine.tensor(r).clone() for r in refs], bool(drawn)

    def _advance(self, upto: int, what: str) -> None:
        """Replay every random operation below ``upto`` not yet passed, on scratch
        tensors freed at once: only the generator's position matters here."""
        ops = self.record.ops
        if self.record.start_state is None:
            raise ValueReadError(f"{what}: the default device is not the CPU, {_CANNOT}")
        cpu = torch.device("cpu")
        with torch.no_grad():
            while self.passed < upto:
                index, op = self.passed, ops[self.passed]
                self.passed += 1
                if isinstance(op.event, Reseed):
                    self.points.reseed(op.event)
                elif op.event is not None:
                    self._twin_draws(op.event)
                if not op.random:
                    continue
                self.states[index] = self.generator.get_state()
                self._scratch_draw(op, what, cpu)

    def _twin_draws(self, event: Declared | Queued | Applied) -> None:
        """The draws of a deferred layer's construction (or of an init call queued on
        it), made on the private generator, when its sizes are known; a layer that
        does not correspond is left to the comparison of the two recordings."""
        earlier = self.record.ops[: self.passed - 1]
        number = sum(1 for op in earlier if isinstance(op.event, Declared | Queued | Applied))
        if number >= len(self.twins) or type(self.twins[number]) is not type(event):
            return
        # Its draws go to the private generator through a dispatch mode (per thread):
        # the process-wide one, which other threads may draw from, is never set.
        drawing = Drawing(0)
        drawing.generators[torch.device("cpu")] = self.generator
        try:
            with drawing:
                self.twin_replay.run(self.twins[number])
        except Exception:  # noqa: BLE001, S110  the replay raises it again, naming the layer
            pass

    def _scratch_draw(self, op: Op, what: str, cpu: torch.device) -> None:
        size = sum(nbytes for _, nbytes in op.creates) + sum(
            r.numel * r.dtype.itemsize for r in _tensor_refs(op)
        )
        packet = getattr(op.func, "overloadpacket", None)
        if getattr(packet, "__name__", None) in _COUNT_FROM_VALUES:
            raise ValueReadError(
                f"{what}: an earlier draw ({op.func}) takes as many random numbers as its "
                f"input's values ask for, and the recording holds no values to replay it "
                f"with, {_CANNOT}"
            )
        if size > SIMULATION_LIMIT or op.kwargs.get("generator") is not None:
            reason = "its own generator" if size <= SIMULATION_LIMIT else f"{size} bytes"
            raise ValueReadError(
                f"{what}: an earlier draw ({op.func}, {reason}) is too costly to replay "
                f"at record time, {_CANNOT}"
            )
        engine = Engine(cpu, self.record.default_device, {}, generator=self.generator)
        for ref in _tensor_refs(op):
            engine.env.setdefault(
                ref.storage,
                torch.zeros(ref.offset + _extent(ref), dtype=ref.dtype).untyped_storage(),
            )
        engine.run(op)


# Draws whose count of random numbers depends on their inputs' values (rejection
# sampling, sampling without replacement): simulated on stand-in inputs they would
# leave the private generator elsewhere than eager's.
_COUNT_FROM_VALUES = frozenset(
    {"multinomial", "poisson", "binomial", "_standard_gamma", "_sample_dirichlet"}
)

_CANNOT = (
    "so a value steered by random numbers cannot be simulated now. Expected: "
    "construction reads only values known from literals, or draws before the read that "
    "can be replayed on the CPU. Fix: move this read out of __init__ (into forward or "
    "after materialize), or construct this module eagerly."
)


def _tensor_refs(op: Op) -> list[TensorRef]:
    found: list[TensorRef] = []
    map_refs((op.args, op.kwargs), found.append, TensorRef)
    return found


def _extent(ref: TensorRef) -> int:
    """Elements of storage a view needs past its offset."""
    if ref.numel == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
