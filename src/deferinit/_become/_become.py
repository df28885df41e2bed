"""The one place where a placeholder *becomes* the layer it stands for.

Why the magic: an optimizer created before the first forward, a parent's
``_modules`` entry and a user's variable all hold the placeholder object, and
d2l-style init functions test ``type(m) == nn.Linear``. So the real layer is
constructed normally (its own ``__init__``, ``reset_parameters`` and RNG use, in
the default dtype and device, exactly as eager code would), and then the same
Python object takes over its ``__dict__`` and ``__class__``. The placeholder
parameters themselves turn into the real ones, keeping their identity. Every
step is recorded so that a failure leaves the layer exactly as it was.

What the placeholder held besides its own state is the user's and is kept: its
hooks (merged behind the layer's own), the full-backward-hook flag, and the
attributes and submodules a user put on it (``layer.tag = ...``,
``layer.extra = nn.ReLU()``), as if they had been set right after an eager
construction. One named like something the built layer sets itself (an
attribute its ``__init__`` sets, such as ``in_features``, or one of its
submodules) would silently replace it or be replaced, so the build is refused
instead (a :class:`DeferredInitError`, the layer left unbuilt).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._compile import _disable_dynamo
from torch.nn.modules.module import _global_forward_hooks
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._declare._copies import constructed_as_copy, next_operation
from .._declare._deferred import BUILD_LOCK, Deferred, placeholders_made
from .._declare._pending import Call, run_pending
from .._declare._placeholder import Holder, placeholder_tensors
from .._declare._rules import Call as Arguments
from .._declare._rules import Described, RuleError, describe, dim
from .._declare._signature import constructor_call, forward_signature
from .._declare._state import State, declared_defaults
from .._errors import DeferredInitError, InferenceError
from .._naming import label
from ._adopt import adopt_placeholders, check_ties, sizes_text
from ._guard import guard_for, inputs_text, mismatch, sizes_unenforced
from ._hooks import (
    fast_path_taken,
    own_hooks_to_run,
    run_forward_hooks,
    run_own_pre_hooks,
    undo_if_a_hook_fails,
)
from ._initialize import run_registered
from ._memo import SHAPE_PASS, ShapeRecorder, from_spec, memo_key, output_spec
from ._transaction import HOOK_TABLES, Transaction

__all__ = ["become", "build_and_run", "release"]


def become(
    module: Deferred,
    values: dict[str, Any],
    *,
    built_from: str | Described | None,
    device: torch.device | str | None = None,
    adopt: bool = True,
    hold: bool = False,
) -> Transaction:
    """Construct the real layer with ``values`` and turn ``module`` into it.

    ``device`` constructs under ``torch.device(device)`` (``"meta"`` allocates
    nothing); ``adopt=False`` leaves the placeholders alone (the shape-only pass,
    whose parameters are fake and about to be rolled back). ``hold=True`` makes
    calls from other threads wait for the build lock until :func:`release`, so none
    sees the layer before its first call (initializer and forward) succeeded.
    """
    state = module._di
    cls = type(module)
    args, kwargs = constructor_call(cls, state.arguments, values)
    next_operation()
    draw = None
    try:
        if state.copies is None:  # the common case: a layer never deep-copied unbuilt
            with declared_defaults(state, device):
                real = cls._di_cls(*args, **kwargs)
        else:
            on = _constructing_on(state, device)
            with declared_defaults(state, device), constructed_as_copy(module, values, on) as draw:
                real = cls._di_cls(*args, **kwargs)
    except Exception as error:
        if state.layout is not None:
            # A layout known from the arguments was not checked by constructing:
            # arguments no size fits raise the declaration's TypeError now.
            state.layout.probed()
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if k not in state.explicit)
        got = f" (inferred {shown} from {built_from})" if built_from else ""
        raise InferenceError(
            f"{label(module)}: {cls._di_cls.__name__} could not be constructed with the "
            f"sizes{got}: {type(error).__name__}: {error}. The layer is left unbuilt. "
            f"Fix: pass an input whose sizes the layer accepts, or give them explicitly."
        ) from error
    check_ties(module, real, values, built_from)
    added = users_additions(module, real)
    if not module.training:
        real.train(False)
    txn = Transaction(module)
    try:
        run = draw.run if draw is not None else run_pending
        _take_over(module, real, state, values, built_from, txn, adopt, device, hold, added, run)
    except BaseException:  # Ctrl-C between two steps included: never half-built
        txn.rollback()
        raise
    return txn


def _constructing_on(state: State, device: torch.device | str | None) -> torch.device:
    """The device a layer's construction puts its tensors on: ``device``, else the
    one its arguments name, else its declaration's default device, else the CPU."""
    if device is not None:
        return torch.device(device)
    given = state.arguments.get("device")
    if given is not None:
        return torch.device(given)
    return state.device if state.device is not None else _CPU


_CPU = torch.device("cpu")


def _take_over(
    module: Deferred,
    real: nn.Module,
    state: State,
    values: dict[str, Any],
    built_from: str | Described | None,
    txn: Transaction,
    adopt: bool,
    device: torch.device | str | None,
    hold: bool,
    added: _Added | None,
    run: Callable[[list[Call]], None] = run_pending,
) -> None:
    ties: list[str] = []
    queued: dict[str, tuple[torch.Tensor, list[Call]]] = {}
    if adopt and placeholders_made(module):
        # Plain tensor attribute access: Parameter's Python __torch_function__ would
        # otherwise run for every .data/.dtype/.device read below.
        with torch._C.DisableTorchFunctionSubclass(), declared_defaults(state, device):
            ties, queued = adopt_placeholders(
                module, real, txn, keep_device=device is not None, run=run
            )
    new = real.__dict__
    own: dict[str, list[Any]] = {}
    ours = module.__dict__
    placeholder_hooks = any(map(ours.get, HOOK_TABLES))  # mostly none: C-level scans
    if not placeholder_hooks and any(map(new.get, HOOK_TABLES)):
        own = {key: list(new[key]) for key in HOOK_TABLES if new.get(key)}
    for key in HOOK_TABLES if placeholder_hooks else ():
        table = ours.get(key)
        if not table:  # none on the placeholder: the layer's own table stays
            if table is not None and new.get(key):
                own[key] = list(new[key])
            continue
        theirs = new.get(key)
        if theirs:
            own[key] = list(theirs)
            merged = [*theirs.items(), *table.items()]  # the layer's own hooks first, as eager
            table.clear()
            table.update((k, _rebind(v, real, module)) for k, v in merged)
        new[key] = table
    full = ours.get(_FULL)
    if full is not None and new.get(_FULL) is None:
        new[_FULL] = full  # torch collects _backward_hooks only when this is True
    keys, names = frozenset(new), frozenset(new["_modules"])
    built_keys = _SHARED.get(keys) or _shared(keys)  # the lookup inline: every build asks
    built_modules = _SHARED.get(names) or _shared(names)
    if added is not None:
        new.update(added[0])
        new["_modules"].update(added[1])
        new["_parameters"].update(added[2])
        new["_buffers"].update(added[3])
        new["_non_persistent_buffers_set"].update(added[4])
    built = object.__new__(State)  # dataclasses.replace, without its per-call field walk
    built.__dict__.update(state.__dict__)
    built.values, built.built_from, built.own_hooks = dict(values), built_from, own
    built.ties, built.queued = tuple(ties), queued or None
    built.built_keys, built.built_modules = built_keys, built_modules
    new["_di"] = built
    guard = guard_for(module, type(real), sizes_unenforced(real))
    new["forward"] = _Held(guard) if hold else guard
    # Dict first, then class: a thread that looks in between finds the guard.
    object.__setattr__(module, "__dict__", new)
    object.__setattr__(module, "__class__", type(real))


_FULL = "_is_full_backward_hook"
# What a freshly declared placeholder holds in its __dict__: nothing of the user's.
_PLACEHOLDER_KEYS = frozenset([*nn.Module().__dict__, "_di"])
# The key sets of built layers, one object per distinct set: every layer of a kind
# has the same ones, and a set per layer is two more objects for the garbage
# collector to walk in a 10,000-layer model (bounded: classes may come without end).
_SHARED: dict[frozenset[str], frozenset[str]] = {}
_MOST_SHARED = 1024


def _shared(keys: frozenset[str]) -> frozenset[str]:
    """The one stored set equal to ``keys`` (``keys`` itself the first time).

    >>> _shared(frozenset({"weight"})) is _shared(frozenset({"weight"}))
    True
    """
    kept = _SHARED.get(keys)
    if kept is None:
        if len(_SHARED) >= _MOST_SHARED:
            _SHARED.clear()
        kept = _SHARED[keys] = keys
    return kept


# What a user added, by name: attributes, submodules, parameters, buffers, and the
# names of the non-persistent ones among those buffers.
_Added = tuple[
    dict[str, Any],
    dict[str, nn.Module | None],
    dict[str, torch.Tensor | None],
    dict[str, torch.Tensor | None],
    set[str],
]


def users_additions(module: nn.Module, real: nn.Module) -> _Added | None:
    """What a user put on the placeholder ``module`` (attributes beside a fresh
    placeholder's, none of deferinit's ``_di*``; submodules other than its
    holders; parameters and buffers registered under names the layer does not
    declare), which the built layer ``real`` is to keep, as eager code registering
    them after construction would; None for none, the common case. One that
    ``real`` sets itself is refused, before anything changed.
    """
    d = module.__dict__
    modules = d["_modules"]
    if d.keys() <= _PLACEHOLDER_KEYS and not modules and not placeholders_made(module):
        return None  # the common case: nothing of the user's
    extra = d.keys() - _PLACEHOLDER_KEYS
    tensors = _users_tensors(module)
    if not extra and not modules and tensors is None:
        return None
    attributes = {k: d[k] for k in d if k in extra and not k.startswith("_di")}
    users = {k: m for k, m in modules.items() if not isinstance(m, Holder)}
    parameters, buffers = tensors or ({}, {})
    taken = [k for k in attributes if k in real.__dict__ or k == "forward"]
    taken += [k for k in users if k in real._modules]
    taken += [k for k in (*parameters, *buffers) if hasattr(real, k)]
    if taken:
        shown = ", ".join(repr(k) for k in taken)
        raise DeferredInitError(
            f"{label(module)}: {shown}, set on the layer before its build, is also set by "
            f"{type(real).__name__}'s own construction: keeping either would silently lose "
            f"the other. The layer is left unbuilt. Fix: give it another name, or set it "
            f"after the build (first forward or di.build)."
        )
    if not attributes and not users and not parameters and not buffers:
        return None
    transient = {k for k in buffers if k in d["_non_persistent_buffers_set"]}
    return attributes, users, parameters, buffers, transient


def _users_tensors(
    module: nn.Module,
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]] | None:
    """The parameters and buffers registered on the placeholder under names its
    layout does not declare (the layer's own root names), or None for none."""
    if not placeholders_made(module):
        return None  # made when first looked at: no one registered anything
    layout = module.__dict__["_di"].layout
    declared = {spec.name for spec in layout.tensors} if layout is not None else set()
    parameters: dict[str, torch.Tensor | None] = {
        k: t for k, t in module._parameters.items() if k not in declared
    }
    buffers = {k: t for k, t in module._buffers.items() if k not in declared}
    if not parameters and not buffers:
        return None
    return parameters, buffers


class _Held:
    """``module.forward`` between a build and the end of its initializer: a call
    from another thread waits for the build lock (the builder holds it), then puts
    the guard in place and runs it."""

    __slots__ = ("guard",)

    def __init__(self, guard: Any) -> None:
        self.guard = guard

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with BUILD_LOCK:
            release(self.guard.module)
        return self.guard(*args, **kwargs)


def release(module: nn.Module) -> None:
    """End :func:`become`'s ``hold``: calls run the guard directly again."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, _Held):
        module.__dict__["forward"] = forward.guard


def _rebind(value: Any, old: object, new: object) -> Any:
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    return value


def build_and_run(module: Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The first forward: build from this call, initialize, run; undo on failure."""
    if torch.compiler.is_compiling():
        return _build_and_run_eagerly(module, args, kwargs)
    # Frame 2: whoever called the placeholder's forward.
    return _build_and_run(module, args, kwargs, own_hooks=sys._getframe(2))


def _build_and_run(
    module: Deferred,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    watch_hooks: bool = True,
    own_hooks: str | types.FrameType = "none",
) -> Any:
    with BUILD_LOCK:
        if not isinstance(module, Deferred):  # another thread built it meanwhile
            return module.forward(*args, **kwargs)
        values = module.infer(args, kwargs)
        if module._di.explicit:
            _refuse_given_mismatch(module, args, kwargs)
        built_from = _described(args, kwargs)
        recorder = SHAPE_PASS.get()
        if recorder is not None:
            return _record_shapes(module, values, built_from, recorder, args, kwargs, own_hooks)
        state = module._di
        # Held until this first call's forward succeeded: another thread calling the
        # layer meanwhile waits for the build lock (this thread holds it), so none
        # computes with tensors that a failure here would take back.
        txn = become(module, values, built_from=built_from, hold=True)
        try:
            if state.init is not None:
                with declared_defaults(state):
                    run_registered(module)
            own_hooks = _resolved(own_hooks, module)
            # The initializer's, or an own hook's, error (or Ctrl-C) goes on unchanged.
            args, kwargs = run_own_pre_hooks(module, args, kwargs, own_hooks)
        except BaseException:
            txn.rollback()
            raise
        try:
            output = type(module).forward(module, *args, **kwargs)
        except BaseException as error:
            txn.rollback()
            if not isinstance(error, Exception):
                raise
            raise _forward_failed(module, values, built_from, error, args) from error
        if own_hooks == "all":
            try:
                output = run_forward_hooks(module, args, kwargs, output)
            except BaseException:
                txn.rollback()
                raise
            release(module)
            return output
        release(module)
        if watch_hooks and module.__dict__.get("_forward_hooks") and not _global_forward_hooks:
            undo_if_a_hook_fails(module, txn)
        return output


def _refuse_given_mismatch(module: Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise the ``ShapeMismatchError`` a layer given every size explicitly raises
    (:mod:`._guard`) where this input gives another value for a size given
    explicitly, before anything is built. Only plain sizes (``di.dim``) are
    compared: another rule may read what legitimately differs from the value
    given (MultiheadAttention's ``kdim`` reads None where key and query agree)."""
    state, cls = module._di, type(module)
    call: Arguments | None = None
    changed = []
    for name, given in state.explicit.items():
        rule = cls._di_rules.get(name)
        if not isinstance(rule, dim):
            continue
        if call is None:
            call = Arguments(args, kwargs, functools.partial(forward_signature, cls))
        try:
            now = rule.infer(call, state.options)
        except RuleError:
            continue  # an input the rule cannot read: the build's own error says why
        if now != given:
            changed.append((name, given, now))
    if changed:
        raise mismatch(module, state, args, changed, kwargs)


def _resolved(own_hooks: str | types.FrameType, module: nn.Module) -> str:
    """:func:`own_hooks_to_run` from the caller's frame (still waiting for this
    call), read only when the built layer registered hooks of its own: without
    any, every answer runs the same hooks."""
    if isinstance(own_hooks, str):
        return own_hooks
    return own_hooks_to_run(own_hooks, module) if module.__dict__["_di"].own_hooks else "none"


def _described(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | Described:
    """The input a build's sizes come from, for messages (worded when shown)."""
    if len(args) == 1 and not kwargs:  # most layers; no generator to join
        x = args[0]
        if type(x) is torch.Tensor and not x.is_nested:
            return Described(x)
        return describe(x)
    return inputs_text(args, kwargs)


def _forward_failed(
    module: nn.Module,
    values: Mapping[str, Any],
    built_from: str | Described,
    error: Exception,
    args: tuple[Any, ...] = (),
) -> InferenceError:
    fix = (
        "pass the input the layer expects (e.g. a floating-point tensor of the right "
        "rank), then call again"
    )
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if on_meta and any(isinstance(a, torch.Tensor) and not a.is_meta for a in args):
        # Built on meta before, then di.reset: its placeholders kept their device.
        fix = (
            "the layer's tensors are on meta (it was built with device='meta', and "
            "di.reset keeps their device): build it on meta again, then allocate it, "
            "di.build(model, x, device='meta'); di.materialize(model)"
        )
    return InferenceError(
        f"{label(module)}: built with {sizes_text(values)} from {built_from}, but its "
        f"forward then failed: {type(error).__name__}: {error}. The layer is left "
        f"unbuilt, with the same placeholders. Fix: {fix}."
    )


def _record_shapes(
    module: Deferred,
    values: dict[str, Any],
    built_from: str | Described,
    recorder: ShapeRecorder,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    own_hooks: str | types.FrameType,
) -> Any:
    """di.build's shape-only pass: construct with fake tensors on the device the
    (fake) input is on, record the sizes, run; no initializer. Rolled back later.
    The layer's own hooks run as they would on any call of the pass."""
    key = memo_key(module, values, args, kwargs)
    if key is not None and key in recorder.memo:
        recorder.records.append((module, values, built_from, None))
        return from_spec(recorder.memo[key])
    given = [*args, *kwargs.values()]
    device = next((a.device for a in given if isinstance(a, torch.Tensor)), None)
    moved = _moved_dtype(module)
    txn = become(module, values, built_from=built_from, device=device, adopt=False)
    recorder.records.append((module, values, built_from, txn))
    if moved is not None:  # .double() before the build: the pass runs it in that dtype too
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point() and t.dtype != moved:
                t.data = t.data.to(moved)
    own_hooks = _resolved(own_hooks, module)
    args, kwargs = run_own_pre_hooks(module, args, kwargs, own_hooks)
    try:
        output = type(module).forward(module, *args, **kwargs)
    except BaseException as error:
        if not isinstance(error, Exception):
            raise  # di.build rolls back every record
        raise _forward_failed(module, values, built_from, error) from error
    if own_hooks == "all":
        output = run_forward_hooks(module, args, kwargs, output)
    if key is not None:
        spec = output_spec(output)
        if spec is not None:
            recorder.memo[key] = spec
    return output


def _moved_dtype(module: Deferred) -> torch.dtype | None:
    """The floating dtype every placeholder of ``module`` was converted to before the
    build (``.double()``, ``.to(torch.bfloat16)``), where it differs from the one
    the layer is constructed in; ``None`` if none was, or they disagree."""
    if not placeholders_made(module):
        return None  # nobody looked at them, so nothing converted them
    dtypes = {
        t.dtype
        for _, t in placeholder_tensors(module)
        if isinstance(t, UninitializedTensorMixin) and t.dtype.is_floating_point
    }
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    return dtype if dtype != module.__dict__["_di"].dtype else None


def _build_and_run_for_compile(
    module: Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Hooks are not watched: the traced Module.__call__ would trace the watch too.
    # No Python frames to read here: the traced Module._call_impl took its fast
    # path exactly when the placeholder and the process had no hook.
    own_hooks = "all" if fast_path_taken(module) else "pre"
    return _build_and_run(module, args, kwargs, watch_hooks=False, own_hooks=own_hooks)


# Never traced by torch.compile: building changes the module itself, so it runs
# eagerly (a graph break) and the compiled code is re-specialized to the built layer.
# Only under compilation: the wrapper costs microseconds on every eager first forward.
# _disable_dynamo is torch.compiler.disable importing torch._dynamo at its first
# call, not here (torch uses it so, for torch.manual_seed): ``import deferinit``
# must not load the compiler (about a second and 70 MiB), which only a compiled
# model needs, and which is loaded by then.
_build_and_run_eagerly = _disable_dynamo(_build_and_run_for_compile)
