"""The mismatch check of a built layer, at almost no cost on the normal path.

A built layer keeps its exact torch class, so the check cannot live in a
subclass; a forward pre-hook costs ~10% on a small MLP. Instead a small callable
is stored as the instance's ``forward`` attribute: it calls the class's forward
and only when that raises does it look at the input, to say which inferred size
changed and how to fix it.

To everything that inspects ``layer.forward`` the guard looks like the bound
method eager torch has there: wrong arguments are reported against the layer's
real ``forward`` signature, ``inspect.signature`` shows it, and
``torch.jit.script`` compiles the class's ``forward`` (it reads the source and
globals through ``__func__``, and decides "method" with ``isinstance``).
"""

from __future__ import annotations

import functools
import gc
import inspect
import sys
import types
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn
from torch._compile import _disable_dynamo

from .._declare._deferred import Deferred
from .._declare._rules import Call, Rule, RuleError, describe
from .._declare._signature import forward_signature
from .._errors import DeferredInitError, ShapeMismatchError
from .._naming import label
from ..nn import TWINS

__all__ = [
    "CheckingGuard",
    "Guard",
    "InputGuard",
    "guard_for",
    "inputs_text",
    "mismatch",
    "sizes_unenforced",
]


class Guard:
    """``module.forward`` of a layer built by deferinit.

    It holds its layer by weak reference: a strong one would make a cycle
    (layer -> forward -> layer) that keeps a dropped model's memory until the
    garbage collector runs, where eager models are freed at once. A bound
    ``forward`` must still outlive the layer's other references, as eager's
    bound method does (``fwd = make_model().forward``): when the layer dies
    while someone else still holds its guard, the guard keeps a copy of the
    layer's state (see :class:`_Outlive`).

    One subclass per layer class (:func:`guard_for`): it carries the class and
    names ``__call__`` like the class's ``forward``, so that a call with wrong
    arguments raises torch's own ``TypeError`` text.
    """

    __slots__ = ("__weakref__", "_heir", "_ref")
    layer_class: ClassVar[type[nn.Module]] = nn.Module
    checks: ClassVar[bool] = False  # a CheckingGuard: sizes compared before forward

    def __init__(self, module: nn.Module) -> None:
        # A plain weak reference: torch.compile traces calling it (not a subclass's).
        self._ref = weakref.ref(module, _Outlive(self))
        self._heir: nn.Module | None = None

    @property
    def module(self) -> nn.Module:
        """The layer (or, once it was freed, the copy this guard kept of it)."""
        module = self._ref()
        if module is None:
            module = self._heir
            if module is None:
                raise DeferredInitError(
                    f"the {self.layer_class.__name__} layer of this forward no longer exists: "
                    f"the garbage collector freed it as part of a reference cycle, where its "
                    f"state cannot be kept for the forward. Fix: keep a reference to the "
                    f"layer, not only to its forward."
                )
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._ref()
        if module is None:
            module = self.module
        try:
            return type(module).forward(module, *args, **kwargs)
        except Exception as error:
            _explain(module, args, kwargs, error)
            raise

    # What a bound method offers, so that inspect and torch.jit see the layer's forward.
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return types.MethodType

    @property
    def __func__(self) -> Any:
        return self.layer_class.forward

    @property
    def __self__(self) -> nn.Module:
        return self.module

    def __getattr__(self, name: str) -> Any:
        # As a bound method: other attributes are the function's (__globals__, __code__ ...).
        if name in _FUNCTION_ATTRIBUTES:
            return getattr(self.layer_class.forward, name)
        raise AttributeError(name)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._ref() is not None:
            return (_rebuild, (self._ref(), self.checks))
        return (_rebuild_kept, (self.module, self.checks))

    def __repr__(self) -> str:
        module = self._ref()
        shown = module if module is not None else self._heir
        return f"<deferinit guarded {self.layer_class.__qualname__}.forward of {shown!r}>"


_FUNCTION_ATTRIBUTES = frozenset(
    {
        "__annotations__",
        "__closure__",
        "__code__",
        "__defaults__",
        "__globals__",
        "__kwdefaults__",
        "__name__",
        "__qualname__",
    }
)


class InputGuard(Guard):
    """The same for the common ``forward(self, input)``: no ``*args`` packing,
    which is most of the guard's cost on small layers."""

    __slots__ = ()

    def __call__(self, input: Any) -> Any:  # noqa: A002 - torch's parameter name
        module = self._ref()
        if module is None:
            module = self.module
        try:
            return type(module).forward(module, input)
        except Exception as error:
            _explain(module, (input,), {}, error)
            raise


class CheckingGuard(Guard):
    """The guard of a layer whose forward may accept a changed inferred size: one
    whose tensors do not depend on its sizes (``InstanceNorm2d()``,
    ``GroupNorm(2, affine=False)``), or a user's class made deferrable with
    ``di.defer`` (its forward may slice the input, ``x[..., : self.half]``). This
    one compares the sizes the input gives with the built ones before the forward
    runs; chosen at build for those layers only (:func:`sizes_unenforced`), so
    torch's layers with weights pay nothing."""

    __slots__ = ()
    checks = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._ref()
        if module is None:
            module = self.module
        _check(module, args, kwargs)
        try:
            return type(module).forward(module, *args, **kwargs)
        except Exception as error:
            _explain(module, args, kwargs, error)
            raise


def _rebuild(module: nn.Module, checks: bool = False) -> Guard:
    # A copied forward alone: its layer was copied whole first, guard included.
    # A copied layer: its state (and guard) is not set yet, so a guard is made.
    existing = module.__dict__.get("forward")
    if isinstance(existing, Guard):
        return existing
    return guard_for(module, type(module), checks=checks)


def _rebuild_kept(module: nn.Module, checks: bool = False) -> Guard:
    """A guard that outlived its layer, copied: it holds its copy of the layer."""
    guard = guard_for(module, type(module), checks=checks)
    guard._heir = module
    return guard


def guard_for(module: nn.Module, cls: type[nn.Module], checks: bool | None = None) -> Guard:
    """The guard of ``module``, a built ``cls``; ``checks``: whether it compares the
    sizes before each forward (None: as :func:`sizes_unenforced` says of ``module``)."""
    if checks is None:
        checks = "_parameters" in module.__dict__ and sizes_unenforced(module)
    return _kind(cls, checks)(module)  # type: ignore[arg-type]  # classes hash; Module's stub confuses mypy


def sizes_unenforced(layer: nn.Module) -> bool:
    """Whether ``layer``'s forward may accept an input whose inferred sizes changed,
    so that only a check before the forward can tell: a layer of a class deferinit
    has no twin of (a user's block made deferrable with ``di.defer``, whose forward
    may slice its input or hold no tensor shaped by the size), or one that holds
    no parameter or buffer at all (every torch layer with one checks its sizes).

    >>> sizes_unenforced(nn.InstanceNorm2d(3)), sizes_unenforced(nn.GroupNorm(2, 4))
    (True, False)
    """
    if type(layer) not in TWINS:
        return True
    stack = [layer]
    while stack:
        module = stack.pop()
        if isinstance(module, Deferred):
            return False  # a layer within, still deferred: it will have its own
        d = module.__dict__
        # Plain loops: every build asks, and most layers answer at their first weight.
        for t in d["_parameters"].values():
            if t is not None:
                return False
        for t in d["_buffers"].values():
            if t is not None:
                return False
        for m in d["_modules"].values():
            if m is not None:
                stack.append(m)
    return True


@functools.lru_cache(maxsize=256)
def _kind(cls: type[nn.Module], checks: bool = False) -> type[Guard]:
    """The guard class for layers of ``cls`` (bounded: a process may define classes
    without end; an evicted class just gets a new guard class next time)."""
    base: type[Guard]
    if checks:
        base = CheckingGuard
    else:
        base = InputGuard if _takes_one_input(cls.forward) else Guard
    call = base.__call__
    renamed = types.FunctionType(
        call.__code__, call.__globals__, "forward", call.__defaults__, call.__closure__
    )
    renamed.__kwdefaults__ = call.__kwdefaults__
    renamed.__qualname__ = getattr(cls.forward, "__qualname__", f"{cls.__qualname__}.forward")
    namespace = {
        "__slots__": (),
        "__call__": renamed,
        "layer_class": cls,
        # Read through the guard as through a bound method (torch.jit finds a method's
        # overloads by the function's module and qualified name).
        "__doc__": cls.forward.__doc__,
        "__module__": cls.forward.__module__,
    }
    return type(f"{base.__name__}[{cls.__qualname__}]", (base,), namespace)


def _takes_one_input(forward: Any) -> bool:
    """Whether ``forward`` is ``forward(self, input)``: read off its code for a
    plain function (a layer class's first build pays for this in a fresh
    interpreter; ``inspect.signature`` costs tens of microseconds), else from its
    signature."""
    code = getattr(forward, "__code__", None)
    if (
        type(forward) is types.FunctionType
        and code is not None
        and "__wrapped__" not in vars(forward)
    ):
        return (
            code.co_argcount == 2
            and code.co_varnames[:2] == ("self", "input")
            and not code.co_posonlyargcount
            and not code.co_kwonlyargcount
            and not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
            and not forward.__defaults__
        )
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return [p.name for p in params] == ["self", "input"] and all(
        p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params
    )


class _Outlive(weakref.ref):  # type: ignore[type-arg]  # of Guard
    """The callback of a guard's weak reference to its layer, called as the
    layer is freed (its ``__dict__`` still intact): if the guard is held elsewhere
    (a kept bound ``forward``), it gets a copy of the layer.

    It is itself a weak reference to the guard: two objects per built layer, where
    a callback bound with ``functools.partial`` takes four. The layer's reference
    stays a plain ``weakref.ref``: torch.compile traces calling only that type.

    That reference cannot simply be strong: a layer's ``__dict__`` holds its
    guard, so any strong path back from the guard is a cycle. The rare holder
    pays for finding that ``__dict__`` (a search of the heap); every other layer
    is freed as an eager one.
    """

    __slots__ = ()

    def __call__(self, _layer: object = None) -> None:  # type: ignore[override]
        guard = weakref.ref.__call__(self)
        if guard is None:
            return
        probe = object()
        holder = {"forward": probe}  # the layer's __dict__ as the only other holder
        # Counted here, in the same frame: a held guard has one reference more.
        if sys.getrefcount(guard) > sys.getrefcount(probe):
            _keep_state(guard)  # type: ignore[arg-type]
        del holder


def _keep_state(guard: Guard) -> None:
    """Give ``guard`` a layer of its own: a shallow copy of the dying layer."""
    for referrer in gc.get_referrers(guard):
        if type(referrer) is dict and referrer.get("forward") is guard and "_di" in referrer:
            heir = object.__new__(guard.layer_class)
            state = dict(referrer)
            del state["forward"]  # the class's forward; and no cycle heir -> guard
            object.__setattr__(heir, "__dict__", state)
            guard._heir = heir
            return


def _check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise ``ShapeMismatchError`` before the forward if an inferred size changed.

    Sizes are read with the rules of the built torch class where deferinit has a
    twin of it (a rank-generic twin's rules read a batched input only, and
    ``InstanceNorm2d`` also takes an unbatched one); an input no rule can read is
    left to the forward.
    """
    state = module.__dict__.get("_di")
    if state is None or state.values is None:
        return
    deferred = state.deferred
    rules = TWINS.get(type(module), deferred._di_rules)
    call = Call(args, kwargs, functools.partial(forward_signature, deferred))
    changed = _changed(state, rules, call)
    if changed:
        _refuse(module, state, args, changed, kwargs)


def _refuse_eagerly(
    module: nn.Module,
    state: Any,
    args: tuple[Any, ...],
    changed: list[tuple[str, Any, Any]],
    kwargs: dict[str, Any],
) -> None:
    raise mismatch(module, state, args, changed, kwargs)


# Under torch.compile, a changed size is a graph break, then this error raised
# eagerly (naming the layer walks the model, which Dynamo cannot trace); a matching
# size traces the check alone. _disable_dynamo: torch.compiler.disable, importing
# the compiler only when first called (see _become.py).
_refuse = _disable_dynamo(_refuse_eagerly)


def _changed(state: Any, rules: Mapping[str, Rule], call: Call) -> list[tuple[str, Any, Any]]:
    """The inferred sizes ``call`` gives otherwise than the layer was built with."""
    changed = []
    for name, rule in rules.items():
        if name not in state.values:
            continue
        try:
            now = rule.infer(call, state.options)
        except RuleError:
            continue
        if now != state.values[name]:
            changed.append((name, state.values[name], now))
    return changed


def _explain(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> None:
    """Raise ``ShapeMismatchError`` if an inferred size changed; else return."""
    state = module.__dict__.get("_di")
    if state is None or state.values is None:
        return
    cls = state.deferred
    signature = forward_signature(cls)
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            return  # wrong arguments: torch's own error says so
    # A rank given to a rank-generic twin: the sizes are read as the twin of that
    # rank reads them (an unbatched input's channel is not on axis 1).
    rules = TWINS.get(type(module), cls._di_rules) if "spatial_dims" in state.explicit else None
    changed = _changed(state, rules or cls._di_rules, Call(args, kwargs, signature))
    if changed:
        raise mismatch(module, state, args, changed, kwargs) from error


def inputs_text(args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> str:
    """The inputs of a call, for messages: each positional one, then each keyword
    one by name (a size may be read off either).

    >>> import torch
    >>> inputs_text((torch.zeros(2, 4),), {"y": torch.zeros(2, 5)})
    'a float32 tensor of shape (2, 4), y=a float32 tensor of shape (2, 5)'
    """
    shown = [describe(a) for a in args]
    shown += [f"{k}={describe(v)}" for k, v in (kwargs or {}).items()]
    return ", ".join(shown) or "no inputs"


def mismatch(
    module: nn.Module,
    state: Any,
    args: tuple[Any, ...],
    changed: list[tuple[str, Any, Any]],
    kwargs: Mapping[str, Any] | None = None,
) -> ShapeMismatchError:
    was = ", ".join(f"{n}={old!r}" for n, old, _ in changed)
    now_text = ", ".join(f"{n}={new!r}" for n, _, new in changed)
    got = inputs_text(args, kwargs)
    if state.built_from is not None:
        how = f"was built for {was} (inferred from {state.built_from})"
        fix = (
            f"give it inputs that match {was}, or call di.reset(model) to forget the "
            f"inferred sizes and re-infer them from the next input (the same parameter "
            f"objects, re-initialized)"
        )
    else:
        how = f"was constructed with {was} given explicitly"
        fix = f"give it inputs that match {was}, or construct it without {was} to infer it"
    return ShapeMismatchError(
        f"{label(module)} {how}, but received {got}, which would need {now_text}. Fix: {fix}."
    )
