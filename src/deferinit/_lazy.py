"""``di.adopt``: torch's own ``nn.Lazy*`` modules become deferinit twins in place.

Code written with ``torch.nn.LazyLinear`` (every PyTorch model of *Dive into Deep
Learning*) gains ``di.build``, building on ``meta``, ``di.materialize``,
checkpoints that size the model and summaries without edits: ``di.adopt(model)``
turns each of torch's 13 Lazy classes into the matching twin of
``deferinit.nn`` with the arguments it was given.

What is kept: the module object itself (its parent's entry, a user's variable),
its registration order, train/eval mode, the hooks registered on it (not torch's
own inference and checkpoint hooks, which go), the attributes and submodules a
user added to it, and its ``UninitializedParameter`` and ``UninitializedBuffer``
objects, which become the twin's placeholders, so an optimizer made before
adoption trains the model after its build. The twin is declared and built in the
dtype and on the device of those tensors (a Lazy module materializes in its
tensors' dtype and device, after ``.double()`` or ``.to(...)`` too), its own
``num_batches_tracked`` placeholder included. What cannot be carried (a parameter
or buffer a user registered beside the Lazy module's own, an instance attribute
that overrides a method) is refused before anything changes.

Why the object is kept by switching its class, as a build does
(``_become/_become.py``) and as torch's Lazy modules themselves do when they
initialize: the root itself may be a Lazy module, and no parent entry can be
replaced for it.

The other entry points of deferinit refuse a model that still holds Lazy modules
(:func:`refuse_lazy`): their sizes come only from their own first forward, which
the shape-only pass cannot run.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import (  # type: ignore[attr-defined]
    UninitializedBuffer,
    UninitializedParameter,
    UninitializedTensorMixin,
    is_lazy,
)

from . import nn as dnn
from ._become._transaction import HOOK_TABLES
from ._declare._deferred import BUILD_LOCK, Deferred
from ._declare._layout import layout_of
from ._declare._pending import set_owner, take_pending
from ._declare._placeholder import PlaceholderBuffer, PlaceholderParameter
from ._errors import ArgumentsError, DeferredInitError
from ._tensors import construct_on_meta

__all__ = ["LAZY_TWINS", "adopt", "arguments_of", "lazy_modules", "refuse_lazy", "waiting_lazy"]

M = TypeVar("M", bound=nn.Module)

# torch's Lazy class -> its twin in deferinit.nn (exact classes: a subclass may
# change what its forward does, which a twin would silently drop).
LAZY_TWINS: dict[type[nn.Module], type[Deferred]] = {
    nn.LazyLinear: dnn.Linear,
    nn.LazyConv1d: dnn.Conv1d,
    nn.LazyConv2d: dnn.Conv2d,
    nn.LazyConv3d: dnn.Conv3d,
    nn.LazyConvTranspose1d: dnn.ConvTranspose1d,
    nn.LazyConvTranspose2d: dnn.ConvTranspose2d,
    nn.LazyConvTranspose3d: dnn.ConvTranspose3d,
    nn.LazyBatchNorm1d: dnn.BatchNorm1d,
    nn.LazyBatchNorm2d: dnn.BatchNorm2d,
    nn.LazyBatchNorm3d: dnn.BatchNorm3d,
    nn.LazyInstanceNorm1d: dnn.InstanceNorm1d,
    nn.LazyInstanceNorm2d: dnn.InstanceNorm2d,
    nn.LazyInstanceNorm3d: dnn.InstanceNorm3d,
}

# Real at construction in torch's Lazy batch norms (a count, 0): not a size-less
# placeholder to keep; the twin's own placeholder takes its place. Its value is
# not lost: torch's Lazy norm zeroes it at its first forward (reset_running_stats),
# as the twin's build gives 0.
_CONSTRUCTED_REAL = frozenset({"num_batches_tracked"})

# torch's handles to the hooks every Lazy module registers for itself, and the
# tables they live in.
_OWN_HOOKS = {
    "_initialize_hook": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
    "_load_hook": ("_load_state_dict_pre_hooks",),
}

_SHOWN = 6  # Lazy modules named in one message


def lazy_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The torch Lazy modules below ``module`` (itself included) that are still
    waiting for their first forward, by qualified name, in registration order.

    A Lazy module whose tensors a checkpoint already gave values is not listed: its
    next forward only switches its class.

    >>> from torch import nn
    >>> [name for name, _ in lazy_modules(nn.Sequential(nn.LazyLinear(4), nn.ReLU()))]
    ['0']
    """
    if not any(_is_lazy_module(sub) for sub in module.modules()):
        return []  # the common case, without building names
    return [(name, sub) for name, sub in module.named_modules() if waiting_lazy(sub)]


def waiting_lazy(module: nn.Module) -> bool:
    """A torch Lazy module that its first forward still has to size: it holds an
    uninitialized tensor, or no tensor at all (InstanceNorm without affine or
    running statistics)."""
    if not _is_lazy_module(module):
        return False
    tensors = [t for _, t in _tensors(module)]
    return any(is_lazy(t) for t in tensors) or not tensors


def _is_lazy_module(module: nn.Module) -> bool:
    return isinstance(module, LazyModuleMixin)


def _names(found: list[tuple[str, nn.Module]]) -> str:
    shown = ", ".join(f"{name or '(the root)'!r} ({type(sub).__name__})" for name, sub in found)
    if len(found) > _SHOWN:
        head = found[:_SHOWN]
        shown = f"{_names(head)} and {len(found) - _SHOWN} more"
    return shown


def refuse_lazy(module: nn.Module, what: str) -> None:
    """Raise if ``module`` holds torch Lazy modules still waiting for their first
    forward: ``what`` (``"di.build"``) cannot size, fill or initialize them.

    >>> from torch import nn
    >>> refuse_lazy(nn.Sequential(nn.Linear(2, 3)), "di.build")  # nothing Lazy: fine
    >>> refuse_lazy(nn.Sequential(nn.LazyLinear(3)), "di.build")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    deferinit._errors.DeferredInitError: di.build: the model holds torch.nn.Lazy* modules, ...
    """
    found = lazy_modules(module)
    if found:
        raise DeferredInitError(
            f"{what}: the model holds torch.nn.Lazy* modules, which only their own first "
            f"forward can size: {_names(found)}. Fix: call di.adopt(model) first; it turns "
            f"them into deferinit layers in place, keeping their parameter objects."
        )


def adopt(module: M) -> M:
    """Turn every torch ``nn.Lazy*`` module below ``module`` (``module`` itself
    included) into its deferinit twin, in place. Returns ``module``.

    Each of torch's 13 Lazy classes (``LazyLinear``, ``LazyConv1d``-``3d``,
    ``LazyConvTranspose1d``-``3d``, ``LazyBatchNorm1d``-``3d``,
    ``LazyInstanceNorm1d``-``3d``) becomes the twin with the arguments it was given
    (read off the module, so a ``momentum`` changed after construction counts).
    The same Python object, in the same place, keeps its
    ``UninitializedParameter`` objects as the twin's placeholders (an optimizer made
    earlier trains the built model), its hooks and its train/eval mode. Lazy
    modules already initialized are left alone. All or nothing: if any Lazy module
    cannot be adopted (a subclass of a Lazy class, or one whose tensors are only
    partly initialized), nothing changes and the error names them all.

    Then everything in deferinit applies: ``di.build`` (bitwise eager, in
    registration order), building on ``meta``, ``di.materialize``,
    ``di.load_state_dict`` and ``di.summary``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(2))
    >>> before = list(net.parameters())
    >>> _ = di.adopt(net)
    >>> net
    Sequential(
      (0): Linear(in_features=?, out_features=8, bias=True)
      (1): ReLU()
      (2): Linear(in_features=?, out_features=2, bias=True)
    )
    >>> _ = di.build(net, (4, 3))
    >>> type(net[0]) is nn.Linear, all(a is b for a, b in zip(net.parameters(), before))
    (True, True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.adopt expects an nn.Module, got {type(module).__name__}. Fix: pass the model."
        )
    with BUILD_LOCK:
        found = lazy_modules(module)
        refused = [
            f"{name or '(the root)'!r}: {why}" for name, sub in found if (why := _refusal(sub))
        ]
        if refused:
            raise DeferredInitError(
                f"di.adopt: {len(refused)} torch Lazy module(s) cannot become deferinit "
                f"layers: {'; '.join(refused)}. Nothing was changed. Fix: replace them by "
                f"deferinit twins (deferinit.nn) or run their first forward yourself."
            )
        plans = [_plan(name, sub) for name, sub in found]  # may fail: nothing changed yet
        _in_registration_order(module, plans)
        done: list[_Adoption] = []
        try:
            for plan in plans:
                done.append(plan)
                plan.commit()
        except BaseException:  # Ctrl-C between two steps included: nothing half-adopted
            for plan in reversed(done):
                plan.rollback()
            raise
    return module


def _in_registration_order(module: nn.Module, plans: list[_Adoption]) -> None:
    """Number the twins that take over Lazy modules (``State.seq``) as if each had
    been declared right after every deferinit layer registered before it: when a
    Lazy module was made is unknown (its construction draws nothing), and inline
    code constructs a container's layers in registration order, so a build
    constructs it where registration order puts it, after those layers (a layer
    declared earlier, outside the container, keeps its earlier place)."""
    adopted = {id(plan.module): plan for plan in plans}
    latest, step = 0.0, 1 / (len(plans) + 1)
    n = 0
    for _, sub in module.named_modules():
        if isinstance(sub, Deferred) and sub._di.seq > latest:
            latest, n = sub._di.seq, 0
        elif (plan := adopted.get(id(sub))) is not None:
            n += 1
            plan.twin._di.seq = latest + n * step


def _refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be adopted, or None."""
    cls = type(module)
    if cls not in LAZY_TWINS:
        lazy = next((c for c in cls.__mro__ if c in LAZY_TWINS), None)
        what = f"a subclass of torch.nn.{lazy.__name__}" if lazy else "a Lazy module"
        return (
            f"{cls.__name__} is {what} that deferinit has no twin for (its own code would be lost)"
        )
    uncarried = _uncarried(module)
    if uncarried is not None:
        return uncarried
    real = [n for n, t in _tensors(module) if not is_lazy(t) and n not in _CONSTRUCTED_REAL]
    if real and len(real) < len([n for n, _ in _tensors(module)]):
        return (
            f"{cls.__name__} holds values for {', '.join(real)} but not for its other "
            f"tensors (a checkpoint loaded with strict=False?); a build would replace them"
        )
    return None


@dataclass(frozen=True)
class _Fresh:
    """What a freshly constructed Lazy module of a class holds, by name (the same
    for every argument of the 13 classes: their tables register ``None`` where a
    flag leaves a tensor out)."""

    attributes: frozenset[str]  # __dict__ keys
    tensors: frozenset[str]  # _parameters and _buffers names


_FRESH: dict[type[nn.Module], _Fresh] = {}


def _fresh(module: nn.Module) -> _Fresh:
    """What a fresh Lazy module of ``module``'s class holds: one constructed on meta
    per class, with 1 for every required argument (``out_features``, ``kernel_size``)."""
    cls = type(module)
    found = _FRESH.get(cls)
    if found is None:
        required = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        made = construct_on_meta(lambda: cls(*[1] * len(required)))
        found = _FRESH[cls] = _Fresh(
            frozenset(made.__dict__), frozenset([*made._parameters, *made._buffers])
        )
    return found


def _added(module: nn.Module) -> list[str]:
    """The ``__dict__`` keys a user added to a Lazy module (a fresh one has none of them)."""
    fresh = _fresh(module).attributes
    return [key for key in module.__dict__ if key not in fresh]


def _shadows(twin: type[Deferred], key: str) -> bool:
    """An instance attribute ``key`` would hide a class attribute (``forward``) or
    deferinit's own record (``_di``)."""
    return key.startswith("_di") or hasattr(twin, key) or hasattr(twin._di_cls, key)


def _uncarried(module: nn.Module) -> str | None:
    """Why what a user added to ``module`` cannot go to its twin, or None.

    Attributes and submodules go along. A parameter or buffer of its own would sit
    among the twin's placeholders, which the build replaces by the built layer's
    tensors; an instance attribute named like a method of the twin or of the built
    class (``forward``) would replace that method.
    """
    cls, twin = type(module), LAZY_TWINS[type(module)]
    tensors = [
        n for n in (*module._parameters, *module._buffers) if n not in _fresh(module).tensors
    ]
    if tensors:
        shown = ", ".join(repr(n) for n in tensors)
        return (
            f"{cls.__name__} holds {shown}, registered beside its own tensors, which its "
            f"twin cannot keep (its build replaces every tensor it holds). Fix: register "
            f"them on a parent module, or adopt before registering them"
        )
    shadowing = [k for k in _added(module) if _shadows(twin, k)]
    if shadowing:
        shown = ", ".join(repr(k) for k in shadowing)
        return (
            f"{cls.__name__} has the instance attribute(s) {shown}, which would replace "
            f"what its twin or the built class names so. Fix: delete them (del "
            f"module.<name>) before di.adopt and set them again once the layer is built"
        )
    return None


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (n, t) for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None
    ]


def arguments_of(module: nn.Module, twin: type[Deferred]) -> dict[str, Any]:
    """The twin's arguments, read off a Lazy module: those that differ from the
    twin's defaults (dtype and device are its tensors', see :func:`_plan`).

    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> arguments_of(nn.LazyConv2d(8, 3, stride=2, bias=False), dnn.Conv2d)
    {'out_channels': 8, 'kernel_size': (3, 3), 'stride': (2, 2), 'bias': False}
    """
    found: dict[str, Any] = {}
    for p in inspect.signature(twin).parameters.values():
        if p.name in ("device", "dtype"):
            continue
        if p.name == "bias":
            if getattr(module, "affine", True):  # a norm without affine has no bias to read
                found["bias"] = module._parameters.get("bias") is not None
        else:
            found[p.name] = getattr(module, p.name)
        if p.name in found and p.default is not p.empty and _same(found[p.name], p.default):
            del found[p.name]
    return found


def _same(value: Any, default: Any) -> bool:
    """``value`` is the default, also as torch stores it (``padding=0`` as ``(0, 0)``)."""
    if isinstance(value, tuple) and not isinstance(default, tuple):
        return bool(value) and all(_same(v, default) for v in value)
    return bool(value == default) and type(value) is type(default)


@dataclass
class _Adoption:
    """One Lazy module's adoption: prepared first (all of them), then committed."""

    module: nn.Module
    twin: Deferred  # a fresh twin whose __dict__ the module takes over
    kept: list[tuple[str, torch.Tensor, type]]  # the Lazy tensors kept: name, class now
    hooks: dict[str, list[tuple[Any, Any]]]  # the hook tables as they were
    added: list[str]  # the __dict__ keys a user added, carried over
    old_dict: dict[str, Any] | None = None
    old_class: type | None = None

    def commit(self) -> None:
        module, new = self.module, self.twin.__dict__
        old = module.__dict__
        self.old_dict, self.old_class = old, type(module)
        for handle, tables in _OWN_HOOKS.items():
            if handle in old:
                for table in tables:
                    old[table].pop(old[handle].id, None)
        for key in self.hooks:  # the same table objects: handles users hold still work
            new[key] = old[key]
        new["training"] = old["training"]
        new["_is_full_backward_hook"] = old.get("_is_full_backward_hook")
        for key in self.added:
            new[key] = old[key]
        new["_modules"].update(old["_modules"])  # a Lazy module has only the user's
        # Dict first, then class, as a build does.
        object.__setattr__(module, "__dict__", new)
        object.__setattr__(module, "__class__", type(self.twin))
        for name, tensor, _ in self.kept:
            tensor.__class__ = (
                PlaceholderParameter if isinstance(tensor, nn.Parameter) else PlaceholderBuffer
            )
            set_owner(tensor, module, name)

    def rollback(self) -> None:
        if self.old_dict is None or self.old_class is None:
            return
        for _, tensor, cls in self.kept:
            take_pending(tensor, keep_queue=True)  # the owner note commit wrote
            tensor.__class__ = cls
        object.__setattr__(self.module, "__class__", self.old_class)
        object.__setattr__(self.module, "__dict__", self.old_dict)
        for key, items in self.hooks.items():
            table = self.old_dict[key]
            table.clear()
            table.update(items)


def _plan(name: str, module: nn.Module) -> _Adoption:
    """A fresh twin holding ``module``'s Lazy tensors, ready to commit."""
    cls = LAZY_TWINS[type(module)]
    arguments = arguments_of(module, cls)
    lazy = [t for _, t in _tensors(module) if isinstance(t, UninitializedTensorMixin)]
    try:
        # Declared on the Lazy module's device, as its own tensors are: the twin's
        # placeholders that do not come from it (num_batches_tracked) are too.
        with torch.device(lazy[0].device) if lazy else contextlib.nullcontext():
            twin = cls(**arguments)
    except (TypeError, ValueError, DeferredInitError) as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        raise DeferredInitError(
            f"di.adopt: {type(module).__name__} {name or '(the root)'!r} cannot become "
            f"deferinit.nn.{cls.__name__}({shown}): {error}. Nothing was changed."
        ) from error
    kept: list[tuple[str, torch.Tensor, type]] = []
    for table, theirs in ((twin._parameters, module._parameters), (twin._buffers, module._buffers)):
        for leaf, tensor in theirs.items():
            if isinstance(tensor, UninitializedParameter | UninitializedBuffer):
                table[leaf] = tensor  # type: ignore[assignment]
                kept.append((leaf, tensor, type(tensor)))
    if kept:  # built as the Lazy module would have materialized them
        state, first = twin._di, kept[0][1]
        state.dtype = first.dtype
        state.device = None if first.device.type == "cpu" else first.device
        if state.dtype is not torch.get_default_dtype():
            state.layout = layout_of(cls, state)
    hooks = {key: list(module.__dict__[key].items()) for key in HOOK_TABLES}
    return _Adoption(module, twin, kept, hooks, _added(module))
