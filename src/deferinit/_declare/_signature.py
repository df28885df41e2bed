"""How a deferred class's arguments map onto the real class's constructor.

Binding what the user gave (fast for the plain signatures of torch layers),
assembling the real constructor call once the inferred sizes are known, and
showing the arguments in a ``repr`` or an error.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._rules import MISSING

if TYPE_CHECKING:
    from ._deferred import Deferred
    from ._state import State

__all__ = [
    "ClassSignature",
    "bind",
    "constructor_args_of",
    "constructor_call",
    "fast_signature",
    "forward_signature",
    "public_signature",
    "quoted",
    "qualname",
]

# Bounded caches: a long-running process may define deferred classes without end
# (a new lambda rule makes a new class); an evicted entry is only recomputed.
_CACHE_SIZE = 256


def forward_signature(cls: type[Deferred]) -> inspect.Signature | None:
    """The real class's forward signature without ``self`` (to find named arguments)."""
    return _forward_signature(cls._di_cls)  # type: ignore[arg-type]  # classes hash


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _forward_signature(real: type) -> inspect.Signature | None:
    try:
        sig = inspect.signature(real.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return sig.replace(parameters=list(sig.parameters.values())[1:])


@functools.lru_cache(maxsize=_CACHE_SIZE)
def fast_signature(
    cls: type[Deferred],
) -> tuple[tuple[str, ...], frozenset[str], frozenset[str]] | None:
    """(positional names, all names, required names) of the public signature when
    it has only plain parameters, else None (then inspect's binder is used)."""
    params = list(cls._di_public_signature.parameters.values())
    plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
    full = cls._di_init_signature.parameters.values()
    plain = plain and all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in full)
    if not plain:
        return None
    return (
        tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD),
        frozenset(p.name for p in params),
        frozenset(p.name for p in params if p.default is p.empty),
    )


class ClassSignature:
    """``__signature__`` of a deferred class for ``inspect.signature(dnn.Linear)``,
    and nothing on its instances (whose signature is their ``__call__``'s)."""

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature

    def __get__(self, instance: object, owner: type | None = None) -> inspect.Signature:
        if instance is not None:
            raise AttributeError("__signature__")
        return self.signature


def public_signature(cls: type[Deferred]) -> inspect.Signature:
    """The real class's signature minus the inferred arguments, return annotation
    included: exactly what DESIGN promises ``inspect.signature`` shows. The rules'
    options (LayerNorm's ``ndim``) are no argument of the real class: they are taken
    by keyword and named in the twin's docstring, not shown here."""
    return cls._di_public_signature


def bind(cls: type[Deferred], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The given constructor arguments by name (inspect.Signature.bind, but fast for
    the plain signatures of torch layers; the slow path words the errors)."""
    fast = fast_signature(cls)
    if fast is not None:
        positional, names, required = fast
        if len(args) <= len(positional):
            arguments = dict(zip(positional, args, strict=False))
            if not (arguments.keys() & kwargs.keys()) and names.issuperset(kwargs):
                arguments.update(kwargs)
                if required.issubset(arguments):
                    return arguments
    return dict(cls._di_public_signature.bind(*args, **kwargs).arguments)


def constructor_call(
    cls: type[Deferred], arguments: Mapping[str, Any], values: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for the real class's constructor."""
    if fast_signature(cls) is not None:  # every parameter can be passed by keyword
        return (), {**arguments, **values}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    params = list(cls._di_init_signature.parameters.values())
    has_var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            args.extend(arguments.get(p.name, ()))
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(arguments.get(p.name, {}))
        elif p.name in values or p.name in arguments:
            value = values[p.name] if p.name in values else arguments[p.name]
            if p.kind is p.POSITIONAL_ONLY or (
                has_var_positional and p.kind is p.POSITIONAL_OR_KEYWORD
            ):
                args.append(value)
            else:
                kwargs[p.name] = value
    return tuple(args), kwargs


def constructor_args_of(cls: type[Deferred], state: State) -> list[str]:
    shown = []
    for p in cls._di_init_signature.parameters.values():
        if p.name in cls._di_rules:
            value = state.explicit.get(p.name, MISSING)
            shown.append(f"{p.name}={'?' if value is MISSING else repr(value)}")
        elif p.name in state.arguments:
            value = state.arguments[p.name]
            if p.kind is p.VAR_POSITIONAL:
                shown.extend(repr(v) for v in value)
            elif p.kind is p.VAR_KEYWORD:
                shown.extend(f"{k}={v!r}" for k, v in value.items())
            else:
                shown.append(f"{p.name}={value!r}")
    shown += [f"{k}={v!r}" for k, v in state.options.items() if v != cls._di_options[k]]
    return shown


def qualname(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    return f"{module}.{cls.__qualname__}"


def quoted(names: Any) -> str:
    return ", ".join(repr(n) for n in names)
