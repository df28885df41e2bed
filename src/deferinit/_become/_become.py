"""The one place where a placeholder *becomes* the layer it stands for.

Why the magic: an optimizer created before the first forward, a parent's
``_modules`` entry and a user's variable all hold the placeholder object, and
d2l-style init functions test ``type(m) == nn.Linear``. So the real layer is
constructed normally (its own ``__init__``, ``reset_parameters`` and RNG use, in
the default dtype and device, exactly as eager code would), and then the same
Python object takes over its ``__dict__`` and ``__class__``. The placeholder
parameters themselves turn into the real ones, keeping their identity. Every
step is recorded so that a failure leaves the layer exactly as it was.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._declare._deferred import (
    BUILD_LOCK,
    Deferred,
    constructor_call,
    placeholder_tensors,
)
from .._declare._layout import freeze
from .._declare._rules import describe
from .._declare._state import State, declared_defaults
from .._errors import InferenceError, ShapeMismatchError
from .._naming import label
from .._swap import exchange_or_raise
from ._guard import guard_for
from ._initialize import run_registered

__all__ = [
    "SHAPE_PASS",
    "ShapeRecorder",
    "Transaction",
    "become",
    "build_and_run",
    "hook_tables",
    "release",
    "tensor_at",
]


class ShapeRecorder:
    """What di.build's shape-only pass learns: ``records`` of (layer, values,
    built_from, undo record or None), rolled back afterwards; and ``memo``, the
    output specs of torch layers already run on meta with the same arguments and
    input specs (a 10,000-layer stack of equal layers runs one of them)."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, dict[str, Any], Any, Transaction | None]] = []
        self.memo: dict[Any, Any] = {}


# Set by di.build while its shape-only pass runs.
SHAPE_PASS: ContextVar[ShapeRecorder | None] = ContextVar("deferinit_shape_pass", default=None)


def _memo_key(
    module: Deferred, values: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A key for torch layers on meta inputs, else None (user classes may compute
    shapes from anything, so they always run)."""
    cls = type(module)
    if kwargs or not cls._di_cls.__module__.startswith("torch.nn."):
        return None
    specs = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.device.type != "meta":
            return None
        specs.append((tuple(a.shape), tuple(a.stride()), a.dtype))
    try:
        key = (cls, freeze(module._di.arguments), freeze(values), tuple(specs))
        hash(key)
    except TypeError:
        return None
    return key


def _output_spec(output: Any) -> Any:
    leaves, spec = tree_flatten(output)
    kinds = [
        (tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else ("leaf", t)
        for t in leaves
    ]
    if any(k[0] == "leaf" and isinstance(k[1], torch.Tensor) for k in kinds):
        return None
    return spec, kinds


def _from_spec(saved: Any) -> Any:
    spec, kinds = saved
    leaves = [
        k[1] if k[0] == "leaf" else torch.empty_strided(k[0], k[1], dtype=k[2], device="meta")
        for k in kinds
    ]
    return tree_unflatten(leaves, spec)


# The hook tables every Module has (forward, pre-forward, backward, state-dict ...).
_HOOK_TABLES = tuple(
    k for k, v in nn.Module().__dict__.items() if isinstance(v, dict) and "hooks" in k
)


def hook_tables(d: Mapping[str, Any]) -> list[str]:
    return [k for k in _HOOK_TABLES if k in d]


class Transaction:
    """Undo record of one :func:`become`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.dict = module.__dict__
        d = module.__dict__
        self.hooks = {k: list(d[k].items()) for k in _HOOK_TABLES if d.get(k)}
        self.tensors: list[tuple[torch.Tensor, type, torch.Tensor]] = []
        self.swaps: list[tuple[torch.Tensor, type, torch.Tensor]] = []

    def rollback(self) -> None:
        # Class first: a thread that looks now waits on the build lock.
        object.__setattr__(self.module, "__class__", self.cls)
        object.__setattr__(self.module, "__dict__", self.dict)
        for key, items in self.hooks.items():
            table = self.dict[key]
            table.clear()
            table.update(items)
        for tensor, cls, data in self.tensors:
            tensor.data = data
            tensor.__class__ = cls
        for a, cls, b in reversed(self.swaps):
            # Refused only while a failed forward's graph is still alive: raising then
            # beats going on with a half rolled-back model.
            exchange_or_raise(
                a,
                b,
                f"undoing the build of {label(self.module)}: a placeholder",
                "drop those references; the layer cannot be used until then.",
            )
            a.__class__ = cls


def become(
    module: Deferred,
    values: dict[str, Any],
    *,
    built_from: str | None,
    device: torch.device | str | None = None,
    adopt: bool = True,
    hold: bool = False,
) -> Transaction:
    """Construct the real layer with ``values`` and turn ``module`` into it.

    ``device`` constructs under ``torch.device(device)`` (``"meta"`` allocates
    nothing); ``adopt=False`` leaves the placeholders alone (the shape-only pass,
    whose parameters are fake and about to be rolled back). ``hold=True`` makes
    calls from other threads wait for the build lock until :func:`release`, so none
    sees the layer before its initializer ran.
    """
    state = module._di
    cls = type(module)
    args, kwargs = constructor_call(cls, state.arguments, values)
    try:
        with declared_defaults(state, device):
            real = cls._di_cls(*args, **kwargs)
    except Exception as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if k not in state.explicit)
        got = f" (inferred {shown} from {built_from})" if built_from else ""
        raise InferenceError(
            f"{label(module)}: {cls._di_cls.__name__} could not be constructed with the "
            f"sizes{got}: {type(error).__name__}: {error}. The layer is left unbuilt. "
            f"Fix: pass an input whose sizes the layer accepts, or give them explicitly."
        ) from error
    _check_ties(module, real, values, built_from)
    if not module.training:
        real.train(False)
    txn = Transaction(module)
    try:
        _take_over(module, real, state, values, built_from, txn, adopt, device, hold)
    except BaseException:  # Ctrl-C between two steps included: never half-built
        txn.rollback()
        raise
    return txn


def _take_over(
    module: Deferred,
    real: nn.Module,
    state: State,
    values: dict[str, Any],
    built_from: str | None,
    txn: Transaction,
    adopt: bool,
    device: torch.device | str | None,
    hold: bool,
) -> None:
    ties: list[str] = []
    if adopt:
        # Plain tensor attribute access: Parameter's Python __torch_function__ would
        # otherwise run for every .data/.dtype/.device read below.
        with torch._C.DisableTorchFunctionSubclass(), declared_defaults(state, device):
            ties = _adopt_placeholders(module, real, txn, keep_device=device is not None)
    new = real.__dict__
    own: dict[str, list[Any]] = {}
    for key in hook_tables(module.__dict__):
        table = module.__dict__[key]
        theirs = new.get(key, {})
        if theirs:
            own[key] = list(theirs)
            merged = [*theirs.items(), *table.items()]  # the layer's own hooks first, as eager
            table.clear()
            table.update((k, _rebind(v, real, module)) for k, v in merged)
        new[key] = table
    built = object.__new__(State)  # dataclasses.replace, without its per-call field walk
    built.__dict__.update(state.__dict__)
    built.values, built.built_from, built.own_hooks = dict(values), built_from, own
    built.ties = tuple(ties)
    new["_di"] = built
    guard = guard_for(module, type(real))
    new["forward"] = _Held(guard) if hold else guard
    # Dict first, then class: a thread that looks in between finds the guard.
    object.__setattr__(module, "__dict__", new)
    object.__setattr__(module, "__class__", type(real))


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


def _check_ties(
    module: nn.Module, real: nn.Module, values: dict[str, Any], built_from: str | None
) -> None:
    """A real tensor assigned to the placeholder before the build (a tie such as
    ``head.weight = emb.weight``) is kept, so it must fit the layer being built:
    checked before anything changes."""
    for name, tensor in placeholder_tensors(module):
        if isinstance(tensor, UninitializedTensorMixin):
            continue
        fresh = tensor_at(real, name)
        if fresh is None or tuple(fresh.shape) == tuple(tensor.shape):
            continue
        got = f" (inferred from {built_from})" if built_from else ""
        raise ShapeMismatchError(
            f"{label(module)}: {name} was assigned a tensor of shape {tuple(tensor.shape)} "
            f"before the build (a tie, such as head.weight = emb.weight), but the sizes "
            f"{_sizes_text(values)}{got} give it shape {tuple(fresh.shape)}. The layer is left "
            f"unbuilt. Fix: pass an input whose sizes agree with the assigned tensor, or "
            f"assign a tensor that fits."
        )


def tensor_at(module: nn.Module, name: str) -> torch.Tensor | None:
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return None
    found = owner._parameters.get(leaf)
    return found if found is not None else owner._buffers.get(leaf)


def _rebind(value: Any, old: object, new: object) -> Any:
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    return value


def _kind(t: torch.Tensor) -> str:
    return "parameter" if isinstance(t, nn.Parameter) else "buffer"


def _adopt_placeholders(
    module: nn.Module, real: nn.Module, txn: Transaction, *, keep_device: bool
) -> list[str]:
    """Put the placeholders' objects in place of the real layer's fresh tensors;
    returns the names that held a real tensor (ties), which the layer keeps."""
    ties: list[str] = []
    adopted: dict[int, torch.Tensor] = {}  # real tensor -> the placeholder now holding it
    for name, placeholder in placeholder_tensors(module):
        owner_name, _, leaf = name.rpartition(".")
        try:
            owner = real.get_submodule(owner_name) if owner_name else real
        except AttributeError:
            continue
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        value = table.get(leaf)
        if value is None:
            continue
        if not isinstance(placeholder, UninitializedTensorMixin):
            # Assigned before the build (head.weight = emb.weight), or another
            # layer's placeholder that its build made real: the tie is kept, as
            # eager code assigning it after construction would have it.
            table[leaf] = placeholder  # type: ignore[assignment]
            ties.append(name)
            continue
        if isinstance(value, UninitializedTensorMixin):
            # A deferred layer inside a block: it adopts this placeholder when it
            # builds, so an optimizer made before the block's build holds it too.
            table[leaf] = placeholder  # type: ignore[assignment]
            continue
        if id(value) in adopted:  # tied in the layer (e.g. head.weight = emb.weight)
            table[leaf] = adopted[id(value)]  # type: ignore[assignment]
            continue
        adopted[id(value)] = placeholder
        data = value.data
        device = data.device if keep_device else placeholder.device
        if data.dtype != placeholder.dtype or data.device != device:
            # The user moved the placeholder (.double(), .to(device)): as eager code
            # would, initialize in the constructor's dtype and device, then convert.
            data = data.to(device=device, dtype=placeholder.dtype)
        if data.device.type == placeholder.device.type:
            txn.tensors.append((placeholder, type(placeholder), placeholder.data))
            placeholder.data = data
            placeholder.__class__ = placeholder.cls_to_become  # type: ignore[attr-defined, union-attr]
        else:
            # .data cannot change the kind of tensor (cpu -> meta): swap the tensors
            # under the Python objects instead; identity is kept all the same.
            if isinstance(placeholder, nn.Parameter):
                built = value if data is value.data else nn.Parameter(data)
            else:
                built = data
            built.requires_grad_(placeholder.requires_grad)
            # Python weak references (RNNs keep them to their weights, users to
            # anything) do not block this swap: the object keeps its identity.
            exchange_or_raise(
                placeholder,
                built,
                f"building {label(module)}: {_kind(placeholder)} {name!r}",
                "drop those references (del them) and build the layer again. The layer "
                "is left unbuilt.",
            )
            txn.swaps.append((placeholder, type(placeholder), built))
            placeholder.__class__ = placeholder.cls_to_become  # type: ignore[attr-defined, union-attr]
        table[leaf] = placeholder  # type: ignore[assignment]
    return ties


# ``Module._call_impl`` and its nested ``inner``: the frames a placeholder's
# forward is called from when called as ``module(x)``.
_CALL_IMPL = nn.Module._call_impl.__code__
_CALL_IMPL_INNER = next(
    c for c in _CALL_IMPL.co_consts if isinstance(c, types.CodeType) and c.co_name == "inner"
)
_SLOW_FORWARD = nn.Module._slow_forward.__code__
# What Module._call_impl's fast path checks.
_CALL_IMPL_TABLES = (
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
)
_GLOBAL_CALL_IMPL_TABLES = (
    _global_backward_pre_hooks,
    _global_backward_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)


def _own_hooks_to_run(caller: types.FrameType | None, module: nn.Module) -> str:
    """Which of the hooks the layer registers in its own ``__init__`` this build
    must run itself, given the frame that called the placeholder's forward.

    ``Module._call_impl`` chose its hooks before the layer existed. With none on
    the placeholder it took its fast path and runs no hook at all: ``"all"``.
    Otherwise (its ``inner``) it already ran its pre-hooks but reads the forward
    hooks after the forward, the layer's own included: ``"pre"``. Called
    directly (``module.forward(x)``), eager torch runs no hook either: ``"none"``.
    """
    if caller is not None and caller.f_code is _SLOW_FORWARD:  # under torch.jit.trace
        caller = caller.f_back
    if caller is None or caller.f_locals.get("self") is not module:
        return "none"
    if caller.f_code is _CALL_IMPL:
        return "all"
    if caller.f_code is _CALL_IMPL_INNER:
        return "pre"
    return "none"


def build_and_run(module: Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The first forward: build from this call, initialize, run; undo on failure."""
    if torch.compiler.is_compiling():
        return _build_and_run_eagerly(module, args, kwargs)
    # Frame 2: whoever called the placeholder's forward.
    return _build_and_run(
        module, args, kwargs, own_hooks=_own_hooks_to_run(sys._getframe(2), module)
    )


def _build_and_run(
    module: Deferred,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    watch_hooks: bool = True,
    own_hooks: str = "none",
) -> Any:
    with BUILD_LOCK:
        if not isinstance(module, Deferred):  # another thread built it meanwhile
            return module.forward(*args, **kwargs)
        values = module.infer(args, kwargs)
        built_from = ", ".join(describe(a) for a in args) or "keyword arguments"
        recorder = SHAPE_PASS.get()
        if recorder is not None:
            return _record_shapes(module, values, built_from, recorder, args, kwargs, own_hooks)
        state = module._di
        txn = become(module, values, built_from=built_from, hold=True)
        try:
            with declared_defaults(state):
                run_registered(module)
            # The initializer's, or an own hook's, error (or Ctrl-C) goes on unchanged.
            args, kwargs = _run_own_pre_hooks(module, args, kwargs, own_hooks)
        except BaseException:
            txn.rollback()
            raise
        release(module)
        try:
            output = type(module).forward(module, *args, **kwargs)
        except BaseException as error:
            txn.rollback()
            if not isinstance(error, Exception):
                raise
            raise _forward_failed(module, values, built_from, error) from error
        if own_hooks == "all":
            try:
                return _run_forward_hooks(module, args, kwargs, output)
            except BaseException:
                txn.rollback()
                raise
        if watch_hooks and module.__dict__.get("_forward_hooks") and not _global_forward_hooks:
            _undo_if_a_hook_fails(module, txn)
        return output


def _forward_failed(
    module: nn.Module, values: Mapping[str, Any], built_from: str, error: Exception
) -> InferenceError:
    return InferenceError(
        f"{label(module)}: built with {_sizes_text(values)} from {built_from}, but its "
        f"forward then failed: {type(error).__name__}: {error}. The layer is left "
        f"unbuilt, with the same placeholders. Fix: pass the input the layer "
        f"expects (e.g. a floating-point tensor of the right rank), then call again."
    )


def _run_own_pre_hooks(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], own_hooks: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run the forward pre-hooks the layer's own ``__init__`` registered, as
    ``Module._call_impl`` would have (see :func:`_own_hooks_to_run`)."""
    if own_hooks == "none":
        return args, kwargs
    d = module.__dict__
    table, with_kwargs = d["_forward_pre_hooks"], d["_forward_pre_hooks_with_kwargs"]
    for hook_id in module._di.own_hooks.get("_forward_pre_hooks", []):
        hook = table.get(hook_id)
        if hook is None:  # removed by the initializer
            continue
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "forward pre-hook must return None or a tuple "
                        f"of (new_args, new_kwargs), but got {result}."
                    )
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def _run_forward_hooks(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """Run the forward hooks (only the layer's own: ``Module._call_impl`` took its
    fast path, so the placeholder had none) as ``Module._call_impl`` would have."""
    d = module.__dict__
    with_kwargs = d["_forward_hooks_with_kwargs"]
    for hook_id, hook in list(d["_forward_hooks"].items()):
        if hook_id in with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def _record_shapes(
    module: Deferred,
    values: dict[str, Any],
    built_from: str,
    recorder: ShapeRecorder,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    own_hooks: str,
) -> Any:
    """di.build's shape-only pass: construct with fake tensors on the device the
    (fake) input is on, record the sizes, run; no initializer. Rolled back later.
    The layer's own hooks run as they would on any call of the pass."""
    key = _memo_key(module, values, args, kwargs)
    if key is not None and key in recorder.memo:
        recorder.records.append((module, values, built_from, None))
        return _from_spec(recorder.memo[key])
    given = [*args, *kwargs.values()]
    device = next((a.device for a in given if isinstance(a, torch.Tensor)), None)
    txn = become(module, values, built_from=built_from, device=device, adopt=False)
    recorder.records.append((module, values, built_from, txn))
    args, kwargs = _run_own_pre_hooks(module, args, kwargs, own_hooks)
    try:
        output = type(module).forward(module, *args, **kwargs)
    except BaseException as error:
        if not isinstance(error, Exception):
            raise  # di.build rolls back every record
        raise _forward_failed(module, values, built_from, error) from error
    if own_hooks == "all":
        output = _run_forward_hooks(module, args, kwargs, output)
    if key is not None:
        spec = _output_spec(output)
        if spec is not None:
            recorder.memo[key] = spec
    return output


def _undo_if_a_hook_fails(module: nn.Module, txn: Transaction) -> None:
    """Make the first call all-or-nothing up to its last forward hook.

    ``Module.__call__`` runs the forward hooks after this build returned. For that
    one call, each hook is wrapped: if one raises (Ctrl-C included), the build is
    undone and the error goes on unchanged; after the last hook the layer's own
    table is back. Same hook ids, so torch's with-kwargs bookkeeping still applies;
    calls from other threads meanwhile run the hooks as they are.
    """
    watch = _HookWatch(module, txn)
    items = list(watch.table.items())
    module.__dict__["_forward_hooks"] = {
        hook_id: watch.wrap(hook, last=i == len(items) - 1)
        for i, (hook_id, hook) in enumerate(items)
    }


class _HookWatch:
    def __init__(self, module: nn.Module, txn: Transaction) -> None:
        self.module = module
        self.txn = txn
        self.table = module.__dict__["_forward_hooks"]
        self.builder = threading.get_ident()
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.module.__dict__["_forward_hooks"] = self.table

    def wrap(self, hook: Any, *, last: bool) -> Any:
        def run(*hook_args: Any) -> Any:
            if not self.open or threading.get_ident() != self.builder:
                return hook(*hook_args)
            try:
                result = hook(*hook_args)
            except BaseException:
                self.close()
                with BUILD_LOCK:
                    self.txn.rollback()
                raise
            if last:
                self.close()
            return result

        return run


def _build_and_run_for_compile(
    module: Deferred, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # Hooks are not watched: the traced Module.__call__ would trace the watch too.
    # No Python frames to read here: the traced Module._call_impl took its fast
    # path exactly when the placeholder and the process had no hook.
    d = module.__dict__
    hooked = any(d[k] for k in _CALL_IMPL_TABLES) or any(_GLOBAL_CALL_IMPL_TABLES)
    own_hooks = "pre" if hooked else "all"
    return _build_and_run(module, args, kwargs, watch_hooks=False, own_hooks=own_hooks)


# Never traced by torch.compile: building changes the module itself, so it runs
# eagerly (a graph break) and the compiled code is re-specialized to the built layer.
# Only under compilation: the wrapper costs microseconds on every eager first forward.
_build_and_run_eagerly = torch.compiler.disable(_build_and_run_for_compile)


def _sizes_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())
