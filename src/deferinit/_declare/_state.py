"""The bookkeeping a deferinit layer carries in its ``__dict__`` (as ``_di``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from ._copies import Copies

if TYPE_CHECKING:
    from ._deferred import Deferred
    from ._layout import Layout
    from ._rules import Described

__all__ = [
    "Initializer",
    "RecordedApply",
    "Registration",
    "State",
    "declared_defaults",
    "default_device",
    "on_device",
    "replace",
]

Initializer = Union[Callable[[nn.Module], Any], Mapping[str, Callable[[torch.Tensor], Any]]]


@dataclass(frozen=True)
class Registration:
    """What runs on a deferred layer right after its construction, whichever path
    builds it: the initializer registered with ``di.initialize`` (``init``; ``None``:
    the layer's own construction only), then each function given to ``Module.apply``
    before the build (``then``), as eager ``construct; net.apply(fn)`` would run it.
    ``prefix`` is the layer's path below the module given to ``di.initialize`` (for
    the glob patterns)."""

    init: Initializer | None
    prefix: str
    then: tuple[Callable[[nn.Module], Any], ...] = ()


class RecordedApply:
    """A function given to ``apply`` on a deferred layer inside ``di.deferred_init``:
    the exact replay runs it at its place in program order (an event of the
    record), so the layer's construction there leaves it out; every other build
    (``seed=``, a rebuild after ``di.reset``) runs it after the layer's initializer,
    as any function applied before the build."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[nn.Module], Any]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module) -> Any:
        return self.fn(module)

    def __repr__(self) -> str:
        return repr(getattr(self.fn, "__qualname__", None) or self.fn)


@dataclass
class State:
    """What a layer made through deferinit remembers, built or not.

    ``deferred`` is the deferred class (``deferinit.nn.Linear``), so that
    ``di.reset`` can turn the built layer back into a placeholder. ``dtype`` and
    ``device`` are torch's defaults when the layer was declared: eager code would
    have constructed the layer under them at that line, so the build does too.
    ``ties`` names the tensors the built layer kept from before its build (a real
    parameter assigned to the placeholder, or another layer's): they are not
    deferinit's, so ``di.reset`` leaves them as they are. ``built_keys`` and
    ``built_modules`` are the ``__dict__`` keys and submodule names the built
    layer's own construction set: anything else on it is the user's, which
    ``di.reset`` keeps. ``queued`` holds, by name within the layer, each
    placeholder object a build on meta adopted and the init calls waiting on it
    for ``di.materialize`` (which refer to that object), when any wait: sharding
    (FSDP2, tensor parallelism) and ``copy.deepcopy`` give the layer tensors that
    carry no queue.
    """

    deferred: type[Deferred]
    arguments: dict[str, Any]  # constructor arguments the user gave, by name
    options: dict[str, Any]  # rule options (e.g. LayerNorm's ndim)
    explicit: dict[str, Any]  # inferable arguments the user (or the options) fixed
    _layout: Layout | None = None  # read as ``layout``
    values: dict[str, Any] | None = None  # every rule argument, once built
    built_from: str | Described | None = None  # the input the sizes were read from
    init: Registration | None = None  # what runs right after the build (_initialize.py)
    initialized: bool = False  # deferinit ran an initializer on this layer
    own_hooks: dict[str, list[Any]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    device: torch.device | None = None  # None: no default device was set (CPU)
    ties: tuple[str, ...] = ()
    built_keys: frozenset[str] = frozenset()
    built_modules: frozenset[str] = frozenset()
    # name -> (placeholder object, init calls waiting on it: _pending.Call tuples).
    # None, not a default factory: a State pickled before this field unpickles too.
    queued: dict[str, tuple[torch.Tensor, list[Any]]] | None = None
    # The layout is worked out when first read (a layer of a known class, whose
    # layout follows from its arguments: most are built before anyone reads it).
    late: bool = False
    # The order of declaration: the constructor calls of every deferinit layer
    # counted, so a build constructs the layers in eager's order (a layer declared
    # before the container that registers it, d2l's shared layer, comes first);
    # di.adopt places an adopted Lazy module's twin between its neighbours' numbers.
    seq: float = 0
    # Built on meta by di.build: each parameter's version counter (by name within the
    # layer) once the build was done, so that di.materialize can tell init code
    # that changed them in place afterwards, which it cannot replay.
    meta_versions: dict[str, int] | None = None
    # Shared by the deep copies of an unbuilt layer: they start out equal (_copies).
    copies: Copies | None = None

    @property
    def layout(self) -> Layout | None:
        """The declared layer's layout (:mod:`._layout`), worked out on first read
        where the declaration left it for later (``late``)."""
        d = self.__dict__
        layout: Layout | None = d.get("_layout", d.get("layout"))  # "layout": pickled before
        if layout is None and d.get("late"):
            # At call time: the layout stage imports this module.
            from ._layout import layout_of  # noqa: PLC0415

            layout = layout_of(self.deferred, self)
            d["_layout"], d["late"] = layout, False
        return layout

    @layout.setter
    def layout(self, value: Layout | None) -> None:
        self.__dict__["_layout"], self.__dict__["late"] = value, False


def default_device() -> torch.device | None:
    """torch's default device now, or None for the plain default (CPU).

    Only reads the mode stack when something is on it: declaring a layer is a
    hot path, and ``torch.get_default_device`` costs microseconds.
    """
    if not torch._C._len_torch_function_stack():
        return None
    device = torch.get_default_device()
    return None if device.type == "cpu" else device


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.device(device)``, or no context where ``device`` is the CPU and torch's
    default device is the CPU already: a device context is a torch function mode,
    through which every operation then passes in Python (a layer's construction is
    a few dozen operations, each some microseconds slower).

    >>> import contextlib, torch
    >>> isinstance(on_device("cpu"), contextlib.nullcontext)
    True
    >>> isinstance(on_device("meta"), torch.device)
    True
    """
    device = torch.device(device)
    if device.type == "cpu" and device.index is None and default_device() is None:
        return contextlib.nullcontext()
    return device


_NOTHING: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


class _DefaultDtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.saved = torch.get_default_dtype()

    def __enter__(self) -> None:
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved)


def declared_defaults(
    state: State, device: torch.device | str | None = None
) -> contextlib.AbstractContextManager[Any]:
    """Construct (and initialize) a layer as eager code would have at its declaration.

    Under the default dtype and device recorded then (``device``, when given, wins),
    and with ordinary trainable tensors even when the first call runs under
    ``torch.no_grad()`` or ``torch.inference_mode()``. torch's default dtype is
    process-wide, so it is only switched when it changed since the declaration.
    """
    target = device if device is not None else state.device
    if (
        target is None
        and state.dtype is torch.get_default_dtype()
        and not torch._C._len_torch_function_stack()
        and torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
    ):
        return _NOTHING  # the common case: eager code's defaults are in force
    contexts: list[contextlib.AbstractContextManager[Any]] = []
    if target is not None:
        if torch.device(target).type != "cpu" or default_device() is not None:
            contexts.append(torch.device(target))
    elif default_device() is not None:
        contexts.append(torch.device("cpu"))
    if state.dtype is not torch.get_default_dtype():
        contexts.append(_DefaultDtype(state.dtype))
    if torch.is_inference_mode_enabled():
        contexts.append(torch.inference_mode(False))
    if not torch.is_grad_enabled():
        contexts.append(torch.enable_grad())
    if not contexts:
        return contextlib.nullcontext()
    if len(contexts) == 1:
        return contexts[0]
    stack = contextlib.ExitStack()
    for context in contexts:
        stack.enter_context(context)
    return stack
