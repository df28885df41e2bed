"""``deferred_init``: run a model's construction on fake tensors and record it.

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init, replay_recorded
>>> _ = torch.manual_seed(0)
>>> eager = nn.Linear(3, 4)
>>> model = deferred_init(nn.Linear, 3, 4)
>>> model.weight.device.type
'meta'
>>> _ = torch.manual_seed(0)
>>> torch.equal(replay_recorded(model).weight, eager.weight)
True
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from .._declare._recording import HOOKS, RECORD_KEY
from .._errors import NotBuiltError
from .._tensors import is_meta
from ._errors import RecordError
from ._placeholders import python_state, swap_in_placeholders
from ._recorder import Recorder
from ._tape import PART_KEY, Applied, Declared, Part, Queued, Record, TensorRef, keep_twin_part
from ._twins import declared

__all__ = [
    "RECORD_KEY",
    "deferred_init",
    "record_construction",
    "recording",
]  # RECORD_KEY re-exported

M = TypeVar("M", bound=nn.Module)

_DATA_PTR = "Accessing the data pointer of FakeTensor"
_state = threading.local()  # dispatch modes are per thread, so is "recording now"


def recording() -> bool:
    """Whether this thread is inside a ``deferred_init``."""
    return bool(getattr(_state, "active", False))


def deferred_init(factory: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """Run ``factory(*args, **kwargs)`` on fake tensors, recording every operation
    that creates or changes a tensor; return the module with ``meta`` placeholders.

    The construction runs exactly as eager (tensors report the ``cpu`` device,
    libraries take their usual branches) but computes nothing, allocates nothing
    and draws from no generator. ``replay_recorded`` replays the record.
    Inside another ``deferred_init`` the factory simply runs: the outer recording
    captures it.

    Args:
        factory: a module class, or any callable returning an ``nn.Module``.
        *args: passed to ``factory``; real tensors among them are read at replay.
        **kwargs: passed to ``factory``.

    Raises:
        RecordError: ``factory`` did not return a module, or the construction does
            something a record cannot replay (see the message).

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> model = di.deferred_init(nn.Linear, 3, 4)
    >>> model.weight.device.type  # nothing allocated, nothing drawn
    'meta'
    >>> _ = torch.manual_seed(0)
    >>> eager = nn.Linear(3, 4)
    >>> _ = torch.manual_seed(0)
    >>> torch.equal(di.materialize(model).weight, eager.weight)
    True
    """
    if recording():
        return factory(*args, **kwargs)
    module, record = record_construction(factory, args, kwargs)
    if record.guarded:  # materialize may record it again, under its own state
        record.rerun = (factory, args, kwargs)
        record.fingerprint = python_state(module)
    twins = {id(layer) for layer in declared(record)}  # once: a walk of the whole record
    for name, sub in module.named_modules():
        if name:  # a part knows its record: materializing it alone is refused (see _replay)
            sub.__dict__[PART_KEY] = Part(record, name)
            if id(sub) in twins:
                keep_twin_part(sub, Part(record, name))
    module.__dict__[RECORD_KEY] = record
    module.register_forward_pre_hook(_before_materialize)
    return module


# torch's message when Module._apply cannot swap a parameter (a fake one, here).
_CONVERTED = "_apply(): Couldn't swap"


def record_construction(
    factory: Callable[..., M],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    twins: Sequence[Declared | Queued | Applied] = (),
) -> tuple[M, Record]:
    """The recording itself: the module, its fake tensors swapped for placeholders,
    and its record (not yet kept on it). ``twins``: see ``Recorder``."""
    device = torch.get_default_device()
    # Reading the state draws nothing; value reads steered by random numbers are
    # simulated from it (see _values).
    record = Record(device, torch.get_rng_state() if device.type == "cpu" else None)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = Recorder(fake, record, twins)
    _state.active = True
    HOOKS.declared, HOOKS.queued = recorder.declared, recorder.queued
    HOOKS.applied = recorder.applied
    HOOKS.outside = _disable_current_modes
    try:
        with fake, recorder, warnings.catch_warnings(), _rewinds_seen(recorder):
            # Tensor.__deepcopy__ (nn.Transformer's layer clones) asks a fake tensor for
            # its data pointer to choose clone(); the answer is right, the deprecation
            # warning is noise (and an error under -W error).
            warnings.filterwarnings("ignore", _DATA_PTR, UserWarning)
            try:
                module = factory(*args, **kwargs)
            except RuntimeError as error:
                if not str(error).startswith(_CONVERTED):
                    raise
                raise RecordError(
                    f"deferred_init: {getattr(factory, '__qualname__', factory)!r} converts "
                    f"a module while it is recorded ({error}: .to(), .half(), .double() "
                    f"and the like swap each parameter, which torch refuses for the fake "
                    f"tensors a recording holds). Nothing was recorded. Fix: convert after "
                    f"the recording, as eager code converts after construction: "
                    f"model = di.deferred_init(...); model.to(torch.bfloat16) (the replay "
                    f"converts the values), or di.materialize(model, dtype=torch.bfloat16)."
                ) from error
        recorder.reseeded()  # after the last draw: eager leaves the generator there
    finally:
        _state.active = False
        HOOKS.declared = HOOKS.queued = HOOKS.applied = None
        HOOKS.outside = contextlib.nullcontext
    if not isinstance(module, nn.Module):
        raise RecordError(
            f"deferred_init: {getattr(factory, '__qualname__', factory)!r} returned "
            f"{type(module).__name__}, expected an nn.Module. Fix: pass a module class or a "
            f"function returning the module."
        )

    def describe(fake_tensor: torch.Tensor) -> TensorRef:
        sid = recorder.sid(fake_tensor)
        if sid is None:
            raise RecordError(
                f"deferred_init: {type(module).__name__} holds a fake tensor no recorded "
                f"operation made. Fix: create its tensors inside the factory."
            )
        return TensorRef.of(fake_tensor, sid)

    record.finals = swap_in_placeholders(module, describe)
    record.make_plan()
    return module, record


# torch.get_rng_state / torch.set_rng_state are watched while any thread records: put
# in place by the first recording, torch's own put back by the last (a count, under a
# lock: recordings in several threads overlap in any order). Each thread's calls go
# to its own recorder, if it records; other threads' go straight through.
_WATCH = threading.Lock()
_watching = 0
_torch_rng: tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]] = (
    torch.random.get_rng_state,
    torch.random.set_rng_state,
)


def _watched_get_rng_state() -> torch.Tensor:
    state = _torch_rng[0]()
    recorder: Recorder | None = getattr(_state, "recorder", None)
    if recorder is not None and recording():
        recorder.snapshot(state)
    return state


def _watched_set_rng_state(new_state: torch.Tensor) -> None:
    recorder: Recorder | None = getattr(_state, "recorder", None)
    if recorder is not None and recording():
        recorder.set_state(new_state)
    _torch_rng[1](new_state)


@contextlib.contextmanager
def _rewinds_seen(recorder: Recorder) -> Iterator[None]:
    """Inside, in this thread, ``torch.get_rng_state`` and ``torch.set_rng_state``
    (``torch.random.fork_rng`` uses them) tell ``recorder`` what they read and are
    about to set (see :meth:`Recorder.set_state`)."""
    global _watching, _torch_rng
    previous = getattr(_state, "recorder", None)
    _state.recorder = recorder
    with _WATCH:
        if _watching == 0:
            _torch_rng = (torch.random.get_rng_state, torch.random.set_rng_state)
            functools.update_wrapper(_watched_get_rng_state, _torch_rng[0])
            functools.update_wrapper(_watched_set_rng_state, _torch_rng[1])
            torch.get_rng_state = torch.random.get_rng_state = _watched_get_rng_state
            torch.set_rng_state = torch.random.set_rng_state = _watched_set_rng_state
        _watching += 1
    try:
        yield
    finally:
        _state.recorder = previous
        with _WATCH:
            _watching -= 1
            if _watching == 0:
                torch.get_rng_state = torch.random.get_rng_state = _torch_rng[0]  # type: ignore[assignment]
                torch.set_rng_state = torch.random.set_rng_state = _torch_rng[1]  # type: ignore[assignment]


def _before_materialize(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward on real data before ``di.materialize`` is refused with the fix, instead
    of torch's "Tensor on device meta is not on the expected device" from somewhere
    inside. Shape-only passes (meta or fake inputs: ``di.build(..., device="meta")``)
    pass, and so does everything once nothing is left on meta."""
    record = module.__dict__.get(RECORD_KEY)
    if record is None:
        return
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    if not inputs or all(is_meta(a) or isinstance(a, FakeTensor) for a in inputs):
        return
    if any(is_meta(f.placeholder) for f in record.finals):
        raise NotBuiltError(
            f"{type(module).__name__} was recorded by di.deferred_init and its tensors are "
            f"still on meta (no values yet), so it cannot run on data. Fix: "
            f"di.materialize(model) first (after di.build(model, example, device='meta') "
            f"if it holds deferred layers), or load its values with di.load_state_dict."
        )
