"""The mismatch check of a built layer, at almost no cost on the normal path.

A built layer keeps its exact torch class, so the check cannot live in a
subclass; a forward pre-hook costs ~10% on a small MLP. Instead a small callable
is stored as the instance's ``forward`` attribute: it calls the class's forward
and only when that raises does it look at the input, to say which inferred size
changed and how to fix it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._errors import ShapeMismatchError
from ._naming import label
from ._rules import Call, RuleError, describe

__all__ = ["Guard"]


class Guard:
    """``module.forward`` of a layer built by deferinit."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        try:
            return type(module).forward(module, *args, **kwargs)
        except Exception as error:
            _explain(module, args, kwargs, error)
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        return (Guard, (self.module,))

    def __repr__(self) -> str:
        return f"<deferinit guarded {type(self.module).__name__}.forward>"


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
