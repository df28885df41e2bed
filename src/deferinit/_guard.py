"""The mismatch check of a built layer, at almost no cost on the normal path.

A built layer keeps its exact torch class, so the check cannot live in a
subclass; a forward pre-hook costs ~10% on a small MLP. Instead a small callable
is stored as the instance's ``forward`` attribute: it calls the class's forward
and only when that raises does it look at the input, to say which inferred size
changed and how to fix it.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

from torch import nn

from ._errors import ShapeMismatchError
from ._naming import label
from ._rules import Call, RuleError, describe

__all__ = ["Guard", "InputGuard", "guard_for"]


class Guard:
    """``module.forward`` of a layer built by deferinit.

    It holds its layer by weak reference: a strong one would make a cycle
    (layer -> forward -> layer) that keeps a dropped model's memory until the
    garbage collector runs, where eager models are freed at once.
    """

    __slots__ = ("__weakref__", "_ref")

    def __init__(self, module: nn.Module) -> None:
        self._ref = weakref.ref(module)

    @property
    def module(self) -> nn.Module:
        module = self._ref()
        if module is None:
            raise ReferenceError("the layer of this forward no longer exists")
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._ref()
        try:
            return type(module).forward(module, *args, **kwargs)  # type: ignore[union-attr]
        except Exception as error:
            _explain(module, args, kwargs, error)  # type: ignore[arg-type]
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.module,))

    def __repr__(self) -> str:
        return f"<deferinit guarded {type(self._ref()).__name__}.forward>"


class InputGuard(Guard):
    """The same for the common ``forward(self, input)``: no ``*args`` packing,
    which is most of the guard's cost on small layers."""

    __slots__ = ()

    def __call__(self, input: Any) -> Any:  # noqa: A002 - torch's parameter name
        module = self._ref()
        try:
            return type(module).forward(module, input)  # type: ignore[union-attr]
        except Exception as error:
            _explain(module, (input,), {}, error)  # type: ignore[arg-type]
            raise


_KINDS: dict[type, type[Guard]] = {}


def guard_for(module: nn.Module, cls: type[nn.Module]) -> Guard:
    """The cheapest guard that fits ``cls.forward``'s signature."""
    kind = _KINDS.get(cls)
    if kind is None:
        kind = Guard
        try:
            params = list(inspect.signature(cls.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        if [p.name for p in params] == ["self", "input"] and all(
            p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params
        ):
            kind = InputGuard
        _KINDS[cls] = kind
    return kind(module)


def _explain(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> None:
    """Raise ``ShapeMismatchError`` if an inferred size changed; else return."""
    from ._deferred import forward_signature  # noqa: PLC0415 - cyclic by nature

    state = module.__dict__.get("_di")
    if state is None or state.values is None:
        return
    cls = state.deferred
    call = Call(args, kwargs, forward_signature(cls))
    changed = []
    for name, rule in cls._di_rules.items():
        try:
            now = rule.infer(call, state.options)
        except RuleError:
            continue
        if now != state.values[name]:
            changed.append((name, state.values[name], now))
    if not changed:
        return
    was = ", ".join(f"{n}={old!r}" for n, old, _ in changed)
    now_text = ", ".join(f"{n}={new!r}" for n, _, new in changed)
    got = ", ".join(describe(a) for a in args) or "keyword arguments"
    if state.built_from is not None:
        how = f"was built for {was} (inferred from {state.built_from})"
        fix = (
            f"give it inputs that match {was}, or call di.reset(model) to forget the "
            f"inferred sizes and re-infer them from the next input (parameters are "
            f"re-created and re-initialized)"
        )
    else:
        how = f"was constructed with {was} given explicitly"
        fix = f"give it inputs that match {was}, or construct it without {was} to infer it"
    raise ShapeMismatchError(
        f"{label(module)} {how}, but received {got}, which would need {now_text}. Fix: {fix}."
    ) from error
