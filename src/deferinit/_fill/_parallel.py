"""The order in which ``di.materialize`` computes its layers' values, and ``seed=``
on every core.

Values are always *placed* in registration order, by the calling thread, each step
logged for undo. They are computed in that order too, except with ``seed=`` on the
CPU when torch may use several threads (``torch.get_num_threads()``, which
``torch.set_num_threads`` sets): a seeded tensor's value depends only on the seed
and its name, so independent layers are computed at the same time by that many
worker threads, each tensor from its own generator (a CPU random fill runs on one
thread, so each worker keeps torch's intra-op threads at one).

A worker runs only torch's own code: layers whose class comes from torch, with no
registered initializer (or a mapping to ``torch.nn.init`` functions, such as
``{"*.weight": nn.init.xavier_uniform_}``), no init call waiting on their
placeholders, no module or tensor among its constructor's arguments, declared
under the current default dtype (switching it would switch it for every thread),
and sharing no tensor with another layer. Any other layer is computed by the
calling thread while no worker runs, as without ``seed=``. Workers change nothing
of the model and touch no process-wide generator; the calling thread places their
values in order, so a failure anywhere undoes everything, as in one thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .._become._initialize import Registration
from .._declare._pending import pending_calls
from .._declare._signature import constructor_call
from .._tensors import own_tensors, tensors_by_name
from ._dispatch import IN_WORKER, hooks_installed
from ._layers import Fill, Rebuild, ResetOnStandIn, Seeds, own_reset
from ._once import Scratch
from ._placing import UNDO

__all__ = ["Filled", "Step", "filled_in_order"]

Values = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Step:
    """One layer to fill: ``kind`` is ``"rebuild"`` (built by deferinit) or
    ``"reset"`` (declared on meta); ``seeds`` its tensors' generator seeds (``seed=``)."""

    kind: str
    name: str
    module: nn.Module
    seeds: Seeds

    def fill(self) -> Fill:
        if self.kind == "rebuild":
            return Rebuild(self.module, self.name)
        return ResetOnStandIn(self.module, self.name)

    def tensors(self) -> dict[str, torch.Tensor]:
        return tensors_by_name(self.module) if self.kind == "rebuild" else own_tensors(self.module)


@dataclass(frozen=True)
class Filled:
    """A step, its :class:`Fill`, and its values (computed already, or as they are read)."""

    step: Step
    fill: Fill
    values: Values


def threads_for(seeded: bool, device: torch.device) -> int:
    """How many threads compute values: torch's thread count with ``seed=`` on the
    CPU, else one.

    >>> import torch
    >>> threads_for(False, torch.device("cpu"))
    1
    """
    return torch.get_num_threads() if seeded and device.type == "cpu" else 1


@contextlib.contextmanager
def filled_in_order(
    steps: Sequence[Step], device: torch.device, dtype: torch.dtype | None, threads: int
) -> Iterator[Iterator[Filled]]:
    """Each step with its values, in order. With ``threads > 1``, steps that may run
    anywhere (:func:`_anywhere`) are computed ahead by that many worker threads;
    leaving the block (an error included) waits for the running ones and drops the
    rest, before the caller undoes anything."""
    if threads <= 1 or len(steps) < 2:
        yield _in_this_thread(steps, device, dtype)
        return
    shared = _shared_tensors(steps)
    anywhere = [_anywhere(step, shared) for step in steps]
    pool = ThreadPoolExecutor(threads, "deferinit-materialize", initializer=_one_thread)
    try:
        with hooks_installed():  # workers neither add nor remove torch's hooks
            yield _with_workers(pool, steps, anywhere, device, dtype)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)  # what new threads start with, as before


def _in_this_thread(
    steps: Sequence[Step], device: torch.device, dtype: torch.dtype | None
) -> Iterator[Filled]:
    scratch = Scratch()  # one for every layer: a fresh one costs its pages again
    for step in steps:
        fill = step.fill()  # now: the steps before may have filled a tensor it shares
        yield Filled(step, fill, fill.values(device, dtype, step.seeds, scratch))


def _with_workers(
    pool: ThreadPoolExecutor,
    steps: Sequence[Step],
    anywhere: list[bool],
    device: torch.device,
    dtype: torch.dtype | None,
) -> Iterator[Filled]:
    """Each run of consecutive steps that may run anywhere goes to the workers when
    the caller reaches it; any other step is computed here, when no worker runs."""
    ahead: dict[int, tuple[Fill, Future[list[tuple[str, torch.Tensor]]]]] = {}
    scratch = Scratch()  # this thread's
    for i, step in enumerate(steps):
        if not anywhere[i]:
            fill = step.fill()
            yield Filled(step, fill, fill.values(device, dtype, step.seeds, scratch))
            continue
        if i not in ahead:
            j = i
            while j < len(steps) and anywhere[j]:
                fill = steps[j].fill()
                context = contextvars.copy_context()  # one per task: errors name layers
                future = pool.submit(context.run, _compute, fill, device, dtype, steps[j].seeds)
                ahead[j] = (fill, future)
                j += 1
        fill, future = ahead.pop(i)
        yield Filled(step, fill, future.result())


def _compute(
    fill: Fill, device: torch.device, dtype: torch.dtype | None, seeds: Seeds
) -> list[tuple[str, torch.Tensor]]:
    """In a worker: every value of one layer."""
    IN_WORKER.set(True)
    UNDO.set(None)  # placing is the calling thread's
    return list(fill.values(device, dtype, seeds, Scratch()))


def _one_thread() -> None:
    torch.set_num_threads(1)


def _shared_tensors(steps: Sequence[Step]) -> set[int]:
    """Tensors that more than one step holds (ties across layers)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for step in steps:
        for t in {id(t) for t in step.tensors().values()}:
            (shared if t in seen else seen).add(t)
    return shared


def _torch_own(code: object) -> bool:
    return str(getattr(code, "__module__", "")).startswith("torch.")


def _torch_init(registered: Registration | None) -> bool:
    """No registered initializer, or a mapping to ``torch.nn.init`` functions."""
    if registered is None:
        return True
    init = registered.init
    return isinstance(init, Mapping) and all(_torch_own(fn) for fn in init.values())


def _anywhere(step: Step, shared: set[int]) -> bool:
    """Whether the step runs only torch's own code and touches no state that
    another thread could see (see the module's docstring)."""
    tensors = step.tensors().values()
    if any(id(t) in shared for t in tensors):
        return False
    if step.kind == "rebuild":
        state = step.module.__dict__["_di"]
        args, kwargs = constructor_call(state.deferred, state.arguments, state.values)
        return (
            _torch_init(state.init)
            and state.dtype is torch.get_default_dtype()
            and not state.queued
            and not any(pending_calls(t) for t in tensors)
            and _torch_own(state.deferred._di_cls)
            # a module or tensor given to the constructor may be copied or used there
            and not any(isinstance(a, nn.Module | torch.Tensor) for a in (*args, *kwargs.values()))
        )
    registered = step.module.__dict__.get("_di_meta_init")
    reset = own_reset(step.module)
    if reset is not None and reset.__name__ == "_reset_parameters":
        return False  # it sets its submodules' tensors too: after they are placed
    return _torch_init(registered) and _torch_own(getattr(reset, "__func__", reset))
