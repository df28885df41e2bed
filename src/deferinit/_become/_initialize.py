"""``di.initialize``: MXNet-style initializers that wait for the data."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._declare._deferred import BUILD_LOCK, Deferred
from .._declare._pending import WaitingCall
from .._declare._state import Initializer, Registration
from .._errors import ArgumentsError, DeferredInitError, InferenceError
from .._lazy import refuse_lazy
from .._naming import qualified_name
from .._tensors import has_meta_tensors

__all__ = [
    "Initializer",
    "Registration",
    "initialize",
    "registered_for_meta",
    "run_applied",
    "run_registered",
]

M = TypeVar("M", bound=nn.Module)

_DONE = "_di_initialized"  # set in a module's __dict__ once deferinit initialized it
_META_INIT = "_di_meta_init"  # an initializer waiting for di.materialize


def initialize(module: M, init: Initializer | None = None, *, force_reinit: bool = False) -> M:
    """Register ``init`` for every deferred layer below ``module``; it runs at build.

    ``init`` is a function of a module, applied as by ``Module.apply``, or a mapping
    from a glob over parameter names (qualified below ``module``; ``*.weight`` also
    matches a top-level ``weight``) to a ``torch.nn.init`` function; each
    parameter takes the last pattern it matches. ``None`` means each layer's own
    ``reset_parameters``. Layers already built are initialized at once, but only
    if deferinit never initialized them, or with ``force_reinit=True``. The latest
    registration wins.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    >>> _ = di.initialize(net, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    >>> _ = net(torch.randn(1, 3))
    >>> bool((net[0].weight == 1).all())
    True
    """
    if not isinstance(module, nn.Module):
        raise ArgumentsError(
            f"di.initialize expects an nn.Module, got {type(module).__name__}. Fix: pass "
            f"the model first, then the init: di.initialize(model, init)."
        )
    refuse_lazy(module, "di.initialize")
    _check(init)
    with BUILD_LOCK:
        undo = _Undo()
        try:
            _visit(module, "", init, force_reinit, set(), undo)
        except BaseException:  # Ctrl-C included: all or nothing, then on unchanged
            undo.rollback()
            raise
    return module


def _check(init: Any) -> None:
    if init is None or callable(init):
        return
    if isinstance(init, Mapping):
        bad = [k for k, v in init.items() if not (isinstance(k, str) and callable(v))]
        if bad:
            raise ArgumentsError(
                f"di.initialize: a mapping must go from a glob string to an init function "
                f"(e.g. {{'*.weight': nn.init.xavier_uniform_}}); bad entries: {bad!r}"
            )
        return
    raise ArgumentsError(
        f"di.initialize: init must be a function of a module, a mapping from parameter "
        f"glob to init function, or None; got {type(init).__name__} {init!r}"
    )


def _visit(
    module: nn.Module,
    name: str,
    init: Initializer | None,
    force: bool,
    seen: set[int],
    undo: _Undo,
) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    prefix = name + "." if name else ""
    registration = None if init is None else Registration(init, prefix)
    if isinstance(module, Deferred):
        undo.set(module._di, "init", _replaced(module._di.init, registration, prefix))
        return
    for child_name, child in module._modules.items():
        if child is not None:
            _visit(child, prefix + child_name, init, force, seen, undo)
    state = module.__dict__.get("_di")
    if state is not None:  # kept for di.reset and di.materialize; the latest call wins
        undo.set(state, "init", _replaced(state.init, registration, prefix))
    if has_meta_tensors(module):
        # Declared on meta: nothing to fill yet; di.materialize runs it.
        undo.set(module, _META_INIT, registration)
        return
    if module.__dict__.get(_DONE) and not force:
        return
    undo.keep(module)
    if _apply_one(module, init, prefix):
        undo.set(module, _DONE, True)


def _replaced(
    old: Registration | None, new: Registration | None, prefix: str
) -> Registration | None:
    """A layer's registration once ``di.initialize`` replaced its initializer: the
    functions given to ``Module.apply`` before its build still run after it."""
    if old is None or not old.then:
        return new
    return Registration(None if new is None else new.init, prefix, old.then)


def _apply_one(module: nn.Module, init: Initializer | None, prefix: str) -> bool:
    if init is None:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return True
        return False
    with _reported(module, init, prefix, error=DeferredInitError, left=_LEFT_BY_INITIALIZE):
        if isinstance(init, Mapping):
            return _apply_mapping(init, module._parameters.items(), prefix)
        init(module)
    return True


_MISSING = object()


class _Undo:
    """What one ``di.initialize`` call changed, put back if it fails: the values,
    ``requires_grad`` flags and registrations of every tensor below the layers whose
    initializer ran (kept before it runs, a copy of each; the same objects get
    their values back), and the registrations and "initialized" marks it set."""

    def __init__(self) -> None:
        self.attributes: list[tuple[Any, str, Any]] = []
        self.tables: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}
        self.modules: set[int] = set()

    def set(self, owner: Any, name: str, value: Any) -> None:
        """``owner.name = value`` in its ``__dict__`` (no ``Module.__setattr__``)."""
        d = owner.__dict__
        self.attributes.append((owner, name, d.get(name, _MISSING)))
        d[name] = value

    def keep(self, module: nn.Module) -> None:
        """Keep what an initializer run on ``module`` may change: every tensor below."""
        stack = [module]
        while stack:
            sub = stack.pop()
            if id(sub) in self.modules or isinstance(sub, Deferred):
                continue  # a placeholder's tensors have no values to keep
            self.modules.add(id(sub))
            stack.extend(m for m in sub._modules.values() if m is not None)
            for table in (sub._parameters, sub._buffers):
                self.tables.append((table, dict(table)))
                for tensor in table.values():
                    if tensor is None or id(tensor) in self.tensors or tensor.is_meta:
                        continue
                    if isinstance(tensor, UninitializedTensorMixin):
                        continue
                    data = tensor.data  # the same storage: put back if replaced
                    self.tensors[id(tensor)] = (
                        tensor,
                        data,
                        data.clone(),
                        tensor.requires_grad,
                    )

    def rollback(self) -> None:
        for table, items in reversed(self.tables):
            table.clear()
            table.update(items)
        with torch.no_grad():
            for tensor, data, saved, requires_grad in self.tensors.values():
                tensor.data = data
                data.copy_(saved)
                if tensor.requires_grad != requires_grad:
                    tensor.requires_grad_(requires_grad)
        for owner, name, value in reversed(self.attributes):
            if value is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = value


_LEFT_BY_BUILD = "The layer is left as it was before this build or initialization."
_LEFT_BY_INITIALIZE = (
    "Every layer is left as it was before this di.initialize call (values, parameter "
    "objects, registrations)."
)


_BY_INITIALIZE = "registered with di.initialize"
_BY_APPLY = "applied with Module.apply before the layer was built"


@contextlib.contextmanager
def _reported(
    module: nn.Module,
    init: Initializer,
    prefix: str,
    name: str | None = None,
    *,
    error: type[DeferredInitError] = InferenceError,
    left: str = _LEFT_BY_BUILD,
    given: str = _BY_INITIALIZE,
) -> Iterator[None]:
    """An initializer's error, the same ``InferenceError`` on every path that
    builds (the first forward, ``di.build``, ``di.materialize``; a plain
    ``DeferredInitError`` from ``di.initialize`` on built layers, where nothing was
    inferred), naming the layer and chained to the original. Errors that are
    already ours, and ``BaseException`` (Ctrl-C, ``SystemExit``), pass unchanged;
    each caller undoes its own step. ``name`` is the layer's qualified name where
    the module is a stand-in outside the model (di.materialize)."""
    try:
        yield
    except DeferredInitError:
        raise
    except Exception as failure:
        if name is None:
            name = qualified_name(module)
        if name is None and prefix:
            name = prefix[:-1]
        layer = f"{type(module).__name__} layer" + (f" {name!r}" if name else "")
        if isinstance(init, WaitingCall):
            raise error(
                f"{layer}: the in-place call {init!r}, made on its placeholder after a "
                f"function was given to Module.apply, raised {type(failure).__name__}: "
                f"{failure}. {left} Fix: make the call fit the built tensor (its sizes "
                f"are known after the build), or make it after the build."
            ) from failure
        noun = "function" if given is _BY_APPLY else "initializer"
        raise error(
            f"{layer}: the {noun} {_shown(init)} {given} raised "
            f"{type(failure).__name__}: {failure}. {left} Fix: make "
            f"the {noun} accept this layer (test isinstance(module, ...) in a "
            f"function{', or narrow the glob patterns' if isinstance(init, Mapping) else ''})."
        ) from failure


def _shown(init: Initializer) -> str:
    if isinstance(init, Mapping):
        return "{" + ", ".join(repr(k) for k in init) + "}"
    return repr(getattr(init, "__qualname__", None) or init)


def _apply_mapping(
    init: Mapping[str, Callable[[torch.Tensor], Any]],
    params: Any,
    prefix: str,
) -> bool:
    applied = False
    with torch.no_grad():
        for name, param in params:
            if param is None:
                continue
            full = prefix + name
            chosen = None
            for pattern, fn in init.items():
                if fnmatchcase(full, pattern) or fnmatchcase("." + full, pattern):
                    chosen = fn
            if chosen is not None:
                chosen(param)
                applied = True
    return applied


def apply_registered(
    module: nn.Module, registered: Registration, *, recurse: bool, name: str | None = None
) -> None:
    """Run one registered initializer on ``module`` (and below, with ``recurse``),
    then the functions applied to it before its build; ``name``: the layer's
    qualified name, where ``module`` is a stand-in for it."""
    init = registered.init
    if init is not None:
        with _reported(module, init, registered.prefix, name):
            if isinstance(init, Mapping):
                params = module.named_parameters() if recurse else module._parameters.items()
                _apply_mapping(init, params, registered.prefix)
            elif recurse:
                module.apply(init)
            else:
                init(module)
    for fn in registered.then:
        with _reported(module, fn, registered.prefix, name, given=_BY_APPLY):
            if recurse and not isinstance(fn, WaitingCall):  # a call on the layer's tensor
                module.apply(fn)
            else:
                fn(module)
    if init is not None:  # Module.apply alone is the user's init, not deferinit's
        for sub in module.modules() if recurse else [module]:
            object.__setattr__(sub, _DONE, True)


def registered_for_meta(module: nn.Module) -> Registration | None:
    """The initializer registered on a module declared on meta (``None``: none, or
    its own ``reset_parameters``), waiting for ``di.materialize``."""
    found: Registration | None = module.__dict__.get(_META_INIT)
    return found


def mark_initialized(module: nn.Module, *, recurse: bool = True) -> None:
    """Record that a registered initializer already ran for ``module`` (and below,
    with ``recurse``) on a copy whose values were placed into it."""
    for sub in module.modules() if recurse else [module]:
        object.__setattr__(sub, _DONE, True)


def run_registered(module: nn.Module) -> None:
    """Run the initializer registered on a layer that just built (under BUILD_LOCK)."""
    state = module.__dict__.get("_di")
    registered: Registration | None = state.init if state is not None else None
    if registered is not None:
        apply_registered(module, registered, recurse=True)
        _forget_waiting_calls(module)


def run_applied(module: nn.Module) -> None:
    """Run the functions given to ``Module.apply`` before the build of a layer that a
    checkpoint just built (under BUILD_LOCK), before its values are written: eager's
    ``construct; net.apply(fn); load`` keeps their side effects (``requires_grad``)
    and the checkpoint's values. The registered initializer does not run: the
    checkpoint gives the values."""
    state = module.__dict__.get("_di")
    registered: Registration | None = state.init if state is not None else None
    if registered is not None and registered.then:
        apply_registered(
            module, Registration(None, registered.prefix, registered.then), recurse=True
        )
        _forget_waiting_calls(module)


def _forget_waiting_calls(module: nn.Module) -> None:
    """The in-place calls queued after the functions applied to a layer that just
    built for real ran once, as the calls waiting on its tensors did (taken at the
    build): ``di.reset`` keeps neither for the next build; the functions applied to
    it stay, as its initializer."""
    state = module.__dict__["_di"]
    registered: Registration = state.init
    then = tuple(fn for fn in registered.then if not isinstance(fn, WaitingCall))
    if len(then) != len(registered.then):
        kept = registered.init is not None or then
        state.init = Registration(registered.init, registered.prefix, then) if kept else None
