"""The deferred placeholder and ``di.defer``, which makes any module class deferrable."""

from __future__ import annotations

import copy
import copyreg
import functools
import inspect
import itertools
import pickle
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .._errors import ArgumentsError, InferenceError, NotBuiltError
from .._naming import label
from ._copies import Copies
from ._layout import KNOWN, layout_of, provisional_constructor
from ._placeholder import flat_placeholders, install_placeholders, save_placeholders
from ._recording import HOOKS
from ._rules import MISSING, Call, Rule, RuleError, as_rule, dim
from ._signature import (
    ClassSignature,
    bind,
    constructor_args_of,
    forward_signature,
    public_signature,
    qualname,
    quoted,
)
from ._state import RecordedApply, Registration, State, default_device

__all__ = [
    "BUILD_LOCK",
    "Deferred",
    "PortableClass",
    "defer",
    "make_deferred",
    "placeholders_made",
]


M = TypeVar("M", bound=nn.Module)

# One re-entrant lock for every build: the first calls of several threads build
# each layer once, and a block that builds nested layers can re-enter.
BUILD_LOCK = threading.RLock()

# Lives as long as the process, so it must not grow with it: a class stays cached
# while something holds it (the twins in deferinit.nn, a user's ``LazyBlock``).
_CLASSES: weakref.WeakValueDictionary[Any, type[Deferred]] = weakref.WeakValueDictionary()


class _DeferredMeta(type):
    """Metaclass of deferred classes, only so that they pickle by recipe.

    ``di.defer(Block, ...)`` creates a class at run time that no module attribute
    names; ``copyreg`` below pickles it as "call defer(Block, ...) again".
    """


def _reduce_class(cls: _DeferredMeta) -> Any:
    """A deferred class pickled as the placeholder's own class: it must infer again
    after unpickling, so every rule must pickle."""
    if cls is Deferred:
        return "Deferred"
    lost = _unpicklable_rules(cls)  # type: ignore[arg-type]
    if lost:
        rules = cls._di_rules  # type: ignore[attr-defined]
        shown = ", ".join(f"{n} ({rules[n].describe()})" for n in lost)
        raise _NotPicklableError(
            f"deferinit {cls.__name__} layer: cannot be pickled before it is built: pickle "
            f"cannot store the rule for {shown} (a lambda or a function defined inside "
            f"another). Fix: build the layer first (a forward pass or di.build), or use "
            f"di.dim(...) or a module-level function as the rule."
        )
    return (_redefer, (cls._di_cls, tuple(cls._di_rules.items())))  # type: ignore[attr-defined]


def _redefer(cls: type[nn.Module], rules: tuple[tuple[str, Rule], ...]) -> type[Deferred]:
    return defer(cls, **dict(rules))


copyreg.pickle(_DeferredMeta, _reduce_class)


def _reduce_state(state: State) -> Any:
    saved = dict(state.__dict__)
    saved["deferred"] = PortableClass(state.deferred)
    return (copyreg.__newobj__, (State,), saved)  # type: ignore[attr-defined]


copyreg.pickle(State, _reduce_state)


def _unpicklable_rules(cls: type[Deferred]) -> list[str]:
    lost: list[str] | None = cls.__dict__.get("_di_unpicklable")
    if lost is None:
        lost = []
        for name, rule in cls._di_rules.items():
            try:
                pickle.dumps(rule)
            except (pickle.PicklingError, TypeError, AttributeError):
                lost.append(name)
        type.__setattr__(cls, "_di_unpicklable", lost)
    return lost


class _NotPicklableError(NotBuiltError, pickle.PicklingError):
    """A placeholder whose rule pickle cannot store (also a ``PicklingError``)."""


@dataclass(frozen=True)
class _Unpickled(Rule):
    """Stands in for a rule pickle could not store, in a layer pickled once built:
    the layer works as built; only inferring again (after ``di.reset``) needs it."""

    shown: str

    def infer(self, call: Call, options: Mapping[str, Any]) -> Any:
        raise RuleError(
            f"its rule, {self.shown}, which was not pickled with the layer (pickle cannot "
            f"store it); re-declare the layer with di.dim(...) or a module-level function",
            "a layer unpickled after its build and then reset",
        )

    def describe(self) -> str:
        return f"{self.shown}, not pickled"


class PortableClass:
    """How a built layer's :class:`State` pickles its deferred class: rules that
    pickle cannot store are replaced by :class:`_Unpickled` stand-ins, so the built
    layer always pickles. ``deepcopy`` keeps the class itself."""

    def __init__(self, cls: type[Deferred]) -> None:
        self.cls = cls

    def __reduce__(self) -> Any:
        cls = self.cls
        lost = _unpicklable_rules(cls)
        if not lost:
            return _reduce_class(cls)  # type: ignore[arg-type]
        rules = tuple(
            (n, _Unpickled(r.describe()) if n in lost else r) for n, r in cls._di_rules.items()
        )
        return (_redefer, (cls._di_cls, rules))

    def __deepcopy__(self, memo: dict[int, Any]) -> type[Deferred]:
        return self.cls


class Deferred(nn.Module, metaclass=_DeferredMeta):
    """A layer whose sizes are not known yet (base of every deferred class).

    Create deferred classes with :func:`defer`; the twins in ``deferinit.nn`` are
    made that way. On its first forward a placeholder infers the missing
    constructor arguments, constructs the real layer and becomes it. ``args`` and
    ``kwargs`` are the real class's constructor arguments minus the inferred ones;
    an inferred one given by keyword fixes it.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4)
    >>> isinstance(layer, di.Deferred)
    True
    >>> _ = layer(torch.randn(2, 3))
    >>> isinstance(layer, di.Deferred), type(layer) is torch.nn.Linear
    (False, True)
    """

    _di_cls: ClassVar[type[nn.Module]]
    _di_rules: ClassVar[dict[str, Rule]]
    _di_options: ClassVar[dict[str, Any]]
    _di_init_signature: ClassVar[inspect.Signature]
    _di_public_signature: ClassVar[inspect.Signature]
    _di: State

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Only make_deferred's classes: a placeholder becomes exactly the real class
        # at its build, so a user's subclass would lose its overrides silently then.
        if cls.__bases__ != (Deferred,) or "_di_cls" not in cls.__dict__:
            raise _subclass_error(cls)
        super().__init_subclass__(**kwargs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        key = _declaration_key(cls, args, kwargs)
        seen = _DECLARATIONS.get(key) if key is not None else None
        if seen is not None:  # declared like this before: same arguments and layout
            self._declare_again(cls, *seen)
            return
        if kwargs:
            options = {k: kwargs.pop(k, v) for k, v in cls._di_options.items()}
            explicit = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._di_rules}
        else:  # the common declaration: no keywords to sort out
            options, explicit = dict(cls._di_options), {}
        try:
            arguments = bind(cls, args, kwargs)
        except TypeError as error:
            raise ArgumentsError(
                f"deferinit {cls.__name__}: {error}. It takes the arguments of "
                f"{qualname(cls._di_cls)}{cls._di_init_signature} except the inferred "
                f"{quoted(cls._di_rules)}, which may be given by keyword to fix them."
            ) from None
        super().__init__()
        for name, rule in cls._di_rules.items():
            if name not in explicit:
                value = rule.static(options, explicit)
                if value is not MISSING:
                    explicit[name] = value
        state = State(cls, arguments, options, explicit)
        state.dtype, state.device = torch.get_default_dtype(), default_device()
        state.seq = next(_DECLARED)
        self.__dict__["_di"] = state  # no Module.__setattr__
        if len(explicit) == len(cls._di_rules):
            _becoming().become(self, explicit, built_from=None)
            return
        layout = None  # a known class's layout is worked out when first read
        if cls._di_cls not in KNOWN or HOOKS.declared is not None:
            with HOOKS.outside():
                layout = layout_of(cls, self._di)
        if key is not None:
            if len(_DECLARATIONS) >= _DECLARATIONS_KEPT:
                _DECLARATIONS.clear()
            _DECLARATIONS[key] = (dict(arguments), dict(options), dict(explicit), layout)
        self._placeholders(state, layout)

    def _declare_again(
        self,
        cls: type[Deferred],
        arguments: dict[str, Any],
        options: dict[str, Any],
        explicit: dict[str, Any],
        layout: Any,
    ) -> None:
        """:meth:`__init__` for a declaration seen before (the same class, arguments
        and default dtype): its bound arguments, options, fixed sizes and layout are
        known (a size left to infer, or it would have been built at once)."""
        _module_init(self)
        state = State(cls, dict(arguments), dict(options), dict(explicit))
        state.dtype, state.device = torch.get_default_dtype(), default_device()
        state.seq = next(_DECLARED)
        self.__dict__["_di"] = state
        self._placeholders(state, layout)

    def _placeholders(self, state: State, layout: Any) -> None:
        if layout is None:
            state.late = True  # State.layout works it out on first read
        else:
            state.layout = layout
        if HOOKS.declared is not None or (layout is not None and layout.modules):
            with HOOKS.outside():
                assert state.layout is not None  # worked out now where it was late
                install_placeholders(self, state.layout, state.arguments.get("device"))
        else:
            # A flat layer's placeholders are made when first looked at
            # (_install_late): most layers are built by their first forward
            # before anyone does, and then the fresh tensors simply stay.
            d = self.__dict__
            del d["_parameters"], d["_buffers"]
        if HOOKS.declared is not None:
            HOOKS.declared(self)  # inside di.deferred_init: its place in program order

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """``copy.deepcopy`` as for any module; where this layer itself is what is
        copied (``nn.TransformerEncoder``'s clones of one layer; not a model holding
        it, which copies into another model of its own), it and its copies share
        one :class:`~deferinit._declare._copies.Copies`: they start out equal, as
        eager's copies of one constructed layer do."""
        if HOOKS.declared is not None:  # inside di.deferred_init
            raise _copied_while_recorded(self)
        state = self.__dict__["_di"]
        if not memo and state.copies is None:  # memo is empty for the object copied
            state.copies = Copies()
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))  # type: ignore[attr-defined]

    def apply(self: M, fn: Callable[[nn.Module], None]) -> M:
        """``Module.apply`` before the build: ``fn`` runs on the built layer (and
        below) right after its construction and registered initializer, whichever
        path builds it, as eager ``construct; net.apply(fn)`` would run it on this
        layer; a placeholder is not what ``fn`` tests for (``type(m) == nn.Linear``).

        >>> import torch
        >>> from torch import nn
        >>> from deferinit import nn as dnn
        >>> layer = dnn.Linear(2).apply(lambda m: nn.init.zeros_(m.weight))
        >>> _ = layer(torch.randn(1, 3))
        >>> bool((layer.weight == 0).all())
        True
        """
        with BUILD_LOCK:
            if not isinstance(self, Deferred):  # another thread built it meanwhile
                return nn.Module.apply(self, fn)
            state = self._di
            queued: Callable[[nn.Module], Any] = fn
            if HOOKS.applied is not None:  # inside di.deferred_init: at its place, too
                HOOKS.applied(self, fn)
                queued = RecordedApply(fn)
            old = state.init
            if old is None:
                state.init = Registration(None, "", (queued,))
            else:
                state.init = Registration(old.init, old.prefix, (*old.then, queued))
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Infer sizes from this call, build, initialize, and run the built layer."""
        return _becoming().build_and_run(self, args, kwargs)

    def infer(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Every constructor argument the rules supply, read off a forward call."""
        values = dict(self._di.explicit)
        cls = type(self)
        call = Call(args, kwargs, functools.partial(forward_signature, cls))
        for name, rule in cls._di_rules.items():
            if name in values:
                continue
            try:
                values[name] = rule.infer(call, self._di.options)
            except RuleError as error:
                origin = rule.origin(call.signature).replace("``", "")  # docstring markup
                raise InferenceError(
                    f"{label(self)} cannot infer {name} (from {origin}): expected "
                    f"{error.expected}, got {error.got}. Fix: pass such an input, or give "
                    f"{name}=... explicitly to build without inference."
                ) from None
        return values

    def __repr__(self) -> str:
        text = None
        try:
            layout = self._di.layout
            if layout is not None:
                text = layout.repr_text(provisional_constructor(type(self), self._di))
        except ArgumentsError:
            pass  # arguments its class rejects: the build says so, not the repr
        if text is not None:
            return f"{self._get_name()}({text})"
        return f"{self._get_name()}({', '.join(constructor_args_of(type(self), self._di))})"

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if "_parameters" not in d and "_di" in d:
            _install_late(self)
            if name == "_parameters" or name == "_buffers":
                return d[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            state = self.__dict__.get("_di")
            if state is None:
                raise
            # Constructor arguments read as the built layer's attributes would be
            # (parameters of the same name, like ``bias``, are found first above).
            if name in state.arguments:
                return state.arguments[name]
            if name in state.explicit:
                return state.explicit[name]
            if name in type(self)._di_rules:
                raise _NotBuiltAttributeError(
                    f"{label(self)}: {name} is not known before the layer is built. "
                    f"Fix: run a forward pass (or load a checkpoint) first, or give {name}=... "
                    f"explicitly."
                ) from None
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d and name != "training" and "_di" in d:
            _install_late(self)  # torch's __setattr__ reads the tables in __dict__
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        if "_parameters" not in self.__dict__:
            _install_late(self)
        super().register_parameter(name, param)

    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if "_buffers" not in self.__dict__:
            _install_late(self)
        super().register_buffer(name, tensor, persistent)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        save_placeholders(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # Imported at call time: sizes from saved shapes are the checkpoint stage's,
        # which imports this module.
        from .._checkpoint._sizes import load_into_placeholder  # noqa: PLC0415

        load_into_placeholder(self, state_dict, prefix, *args)


# Counts every deferinit layer's declaration (State.seq): eager's construction order.
_DECLARED = itertools.count(1)
# Declarations seen before, by (class, default dtype, arguments and their types, the
# keywords in their order) where every argument is a plain scalar: (bound arguments,
# options, fixed sizes, layout). Bounded: a process may declare without end.
_DECLARATIONS: dict[Any, tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]] = {}
_DECLARATIONS_KEPT = 256
_SCALAR_TYPES = frozenset({int, float, bool, str, type(None)})


# What nn.Module.__init__ sets, read off one: the plain values, and each container
# with its type (every module gets fresh ones).
_MODULE_STATE = nn.Module().__dict__
_MODULE_VALUES = {k: v for k, v in _MODULE_STATE.items() if not isinstance(v, dict | set)}
_MODULE_TABLES = tuple((k, type(v)) for k, v in _MODULE_STATE.items() if isinstance(v, dict | set))
del _MODULE_STATE


def _module_init(module: nn.Module) -> None:
    """``nn.Module.__init__`` for a placeholder declared again: the same attributes
    (torch's usage log aside), set straight into ``__dict__``."""
    d = module.__dict__
    d.update(_MODULE_VALUES)
    for key, table in _MODULE_TABLES:
        d[key] = table()


def _declaration_key(cls: type[Deferred], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The key of a declaration in :data:`_DECLARATIONS`, or None where an argument
    is not a plain scalar (a tensor, a tuple or a list is looked at afresh)."""
    types = tuple(map(type, (*args, *kwargs.values())))
    if not _SCALAR_TYPES.issuperset(types):
        return None
    return (cls, torch.get_default_dtype(), args, types, tuple(kwargs.items()))


def _copied_while_recorded(layer: Deferred) -> Exception:
    from .._record._errors import RecordError  # noqa: PLC0415 - the record stage sits above

    return RecordError(
        f"deferred_init: {label(layer)} is deep-copied inside the recorded construction "
        f"(copy.deepcopy, or nn.TransformerEncoder/TransformerDecoder cloning its layer), "
        f"which its replay cannot construct in program order yet: the copies would have "
        f"no place of their own in the record. Nothing was recorded. Fix: give the copied "
        f"layer its sizes (torch.nn instead of deferinit.nn) inside the factory, or build "
        f"the model without di.deferred_init (di.build(model, example, device='meta'), "
        f"then di.materialize(model): its copies start equal, as eager's)."
    )


def placeholders_made(module: nn.Module) -> bool:
    """Whether a placeholder's tensors exist yet: a flat layer makes them when first
    looked at (``module._parameters``, ``module.weight``, ``parameters()``...);
    until then no one can hold one, so its build has nothing to take over."""
    return "_parameters" in module.__dict__


def _install_late(module: Deferred) -> None:
    """Make a flat layer's placeholders now, as its declaration would have: on the
    device it was declared on, outside any recording or shape-only pass."""
    with BUILD_LOCK:
        d = module.__dict__
        if "_parameters" in d:  # another thread made them meanwhile
            return
        state = d["_di"]
        device = state.arguments.get("device")
        if device is None:
            device = state.device if state.device is not None else _CPU
        with HOOKS.outside():
            parameters, buffers = flat_placeholders(module, state.layout, device)
        # Published whole, the parameters last: another thread reading the tables
        # meanwhile waits above for the lock, never sees them half made.
        d["_buffers"] = buffers
        d["_parameters"] = parameters


_CPU = torch.device("cpu")


def _becoming() -> ModuleType:
    """The becoming stage, which a placeholder hands itself to (both to build at
    once when every size is given, and to build at its first forward)."""
    # Read off sys.modules once imported (the import machinery costs microseconds
    # a layer); imported at call time the first time: the placeholder starts the
    # stage above it, which imports this module.
    found = sys.modules.get("deferinit._become._become")
    if found is not None:
        return found
    from .._become import _become  # noqa: PLC0415

    return _become


def _subclass_error(cls: type) -> TypeError:
    """A plain ``TypeError``, as ``di.defer``'s refusals of a class are: a class
    definition, not a layer, is wrong."""
    base = next((b for b in cls.__mro__[1:] if "_di_cls" in b.__dict__), None)
    if base is None:
        return TypeError(
            f"deferinit: class {cls.__name__}(di.Deferred) cannot be subclassed by hand: "
            f"deferred classes are made by di.defer. Fix: write {cls.__name__} as an "
            f"ordinary nn.Module class and make it deferrable with di.defer({cls.__name__}, "
            f"<argument>=di.dim(-1))."
        )
    real = base._di_cls  # type: ignore[attr-defined]
    rules: dict[str, Rule] = base._di_rules  # type: ignore[attr-defined]
    classes = getattr(real, "classes", None)
    if classes is None:
        torch_classes = qualname(real)
        shown = ", ".join(f"{n}={_shown_rule(r)}" for n, r in rules.items())
        note = ""
    else:  # a rank-generic twin (deferinit.nn.Conv) stands for a torch class per rank
        torch_classes = " or ".join(qualname(c) for c in classes)
        own = inspect.signature(classes[0].__init__).parameters
        shown = ", ".join(f"{n}=..." for n in rules if n in own)
        note = ", with the rules of that class's twin in deferinit.nn"
    return TypeError(
        f"deferinit: class {cls.__name__} cannot subclass the deferred {base.__name__}: "
        f"at its build a deferred layer becomes exactly {torch_classes}, so "
        f"{cls.__name__}'s own methods would be lost then. Fix: subclass {torch_classes} "
        f"instead and make that class deferrable: di.defer({cls.__name__}, {shown}){note}."
    )


def _shown_rule(rule: Rule) -> str:
    """A rule as the user would write it, where it is a plain ``di.dim``."""
    if isinstance(rule, dim):
        shown = [repr(rule.axis)]
        if rule.arg != 0:
            shown.append(f"arg={rule.arg!r}")
        if rule.ndim is not None:
            shown.append(f"ndim={rule.ndim!r}")
        return f"di.dim({', '.join(shown)})"
    return f"<{rule.describe()}>"


class _NotBuiltAttributeError(NotBuiltError, AttributeError):
    """An inferred size read before build; also an ``AttributeError`` so ``hasattr`` works."""


def defer(cls: type[M], **rules: Rule | Callable[..., Any]) -> type[Deferred]:
    """Make any ``nn.Module`` class deferrable.

    Each keyword of ``rules`` names a constructor argument of ``cls`` and says how to infer it
    from the forward arguments: :func:`deferinit.dim` or a callable of them. The
    returned class takes ``cls``'s arguments minus the inferred ones (positional
    arguments skip them), builds on the first forward and then *is* a ``cls``.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self, in_dim: int, out_dim: int) -> None:
    ...         super().__init__()
    ...         self.proj = nn.Linear(in_dim, out_dim)
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return torch.relu(self.proj(x))
    >>> LazyBlock = di.defer(Block, in_dim=di.dim(-1))
    >>> block = LazyBlock(out_dim=4)
    >>> block
    Block(in_dim=?, out_dim=4)
    >>> block(torch.randn(2, 3)).shape, type(block) is Block
    (torch.Size([2, 4]), True)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArgumentsError(
            f"di.defer expects an nn.Module class, got {cls!r}. Fix: pass the class itself, "
            f"e.g. di.defer(Block, in_dim=di.dim(-1))."
        )
    if isinstance(cls, _DeferredMeta):
        raise ArgumentsError(
            f"{cls.__name__} is already deferred; defer the original class (Fix: "
            f"di.defer(Original, ...), not of its deferred class)."
        )
    if not rules:
        raise ArgumentsError(
            f"di.defer({cls.__name__}) needs at least one rule, e.g. in_features=di.dim(-1)"
        )
    return make_deferred(cls, rules)


_Parameter = inspect.Parameter


def _forwarded(cls: type[nn.Module]) -> list[inspect.Parameter] | None:
    """The constructor arguments of a class whose ``__init__`` forwards ``*args``
    and ``**kwargs`` (``super().__init__(*args, **kwargs)``): its own named ones, then
    those of the next ``__init__`` up the MRO, followed while each forwards. Every
    one can be passed by keyword, as the real constructor is then called. ``None``
    where ``__init__`` forwards nothing, or to a constructor whose arguments its
    signature does not show (``nn.Module``'s, torch's RNNs': passed on reworked)."""
    inits = [c for c in cls.__mro__ if "__init__" in c.__dict__]
    positional: list[inspect.Parameter] = []
    keyword: list[inspect.Parameter] = []
    seen: set[str] = set()
    takes_args = takes_kwargs = True  # what the forwarding so far passes on
    for owner in inits:
        if owner is nn.Module or owner is object:
            return None
        try:
            params = list(inspect.signature(owner.__init__).parameters.values())[1:]  # type: ignore[misc]
        except (TypeError, ValueError):
            return None
        kinds = {p.kind for p in params}
        named = [
            p for p in params if p.kind not in (_Parameter.VAR_POSITIONAL, _Parameter.VAR_KEYWORD)
        ]
        if owner is inits[0]:
            if not kinds & {_Parameter.VAR_POSITIONAL, _Parameter.VAR_KEYWORD}:
                return None  # forwards nothing: its own signature is the whole story
        elif not named and owner.__module__.startswith("torch."):
            return None  # torch's own forwarder (nn.LSTM): it passes arguments on reworked
        for p in named:
            if p.name in seen:
                continue  # taken by a class below, which passes on the rest
            if p.kind is _Parameter.POSITIONAL_ONLY:
                return None  # not passable by keyword
            seen.add(p.name)
            defaulted = any(q.default is not q.empty for q in positional)
            if (
                p.kind is _Parameter.POSITIONAL_OR_KEYWORD
                and takes_args
                and (p.default is not p.empty or not defaulted)
            ):
                positional.append(p)
            elif takes_kwargs:
                keyword.append(p.replace(kind=_Parameter.KEYWORD_ONLY))
            elif p.default is p.empty:
                return None  # a required argument no caller can reach
        if _Parameter.VAR_POSITIONAL not in kinds and _Parameter.VAR_KEYWORD not in kinds:
            return positional + keyword
        takes_args = takes_args and _Parameter.VAR_POSITIONAL in kinds
        takes_kwargs = takes_kwargs and _Parameter.VAR_KEYWORD in kinds
    return None


def make_deferred(
    cls: type[nn.Module],
    rules: Mapping[str, Rule | Callable[..., Any]],
    signature: inspect.Signature | None = None,
) -> type[Deferred]:
    """:func:`defer`, with the constructor signature given for classes whose
    ``__init__`` only shows ``*args, **kwargs`` (torch's RNN, LSTM, GRU)."""
    parsed = {name: as_rule(rule) for name, rule in rules.items()}
    key: Any = (cls, tuple(parsed.items()))
    try:
        cached = _CLASSES.get(key)
    except TypeError:  # unhashable rule: no caching
        key = cached = None
    if cached is not None:
        return cached
    if signature is None:
        signature = inspect.signature(cls.__init__)
        params = _forwarded(cls) or list(signature.parameters.values())[1:]
    else:
        params = list(signature.parameters.values())
    names = {p.name for p in params}
    unknown = [n for n in parsed if n not in names]
    if unknown:
        raise ArgumentsError(
            f"di.defer({cls.__name__}): {quoted(unknown)} not a constructor argument of "
            f"{cls.__name__}; its arguments are {', '.join(names) or 'none'}. Fix: name "
            f"one of those in the rule."
        )
    options: dict[str, Any] = {}
    for rule in parsed.values():
        options.update(rule.options)
    init_signature = signature.replace(parameters=params)
    public = init_signature.replace(parameters=[p for p in params if p.name not in parsed])
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": f"Deferred {cls.__name__}: {', '.join(parsed)} inferred from the input.",
        "_di_cls": cls,
        "_di_rules": parsed,
        "_di_options": options,
        "_di_init_signature": init_signature,
        "_di_public_signature": public,
    }
    deferred = _DeferredMeta(cls.__name__, (Deferred,), namespace)
    # inspect.signature(LazyBlock): Block's arguments minus the inferred ones, as the twins.
    deferred.__signature__ = ClassSignature(public_signature(deferred))  # type: ignore[attr-defined, arg-type]
    if key is not None:
        _CLASSES[key] = deferred  # type: ignore[assignment]
    return deferred  # type: ignore[return-value]
