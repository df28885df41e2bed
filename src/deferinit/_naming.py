"""Qualified layer names for error messages, found only when an error happens.

A module does not know its own name. Rather than keeping parent links up to date
on every attribute assignment, the name is resolved at error time: the modules
being called are on the Python stack (``Module._call_impl`` frames), the
outermost of them is the model the user called, and the layer's qualified name
is its path below that model. The normal forward path pays nothing, and the
answer stays right after ``deepcopy`` and ``pickle``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar

from torch import nn

__all__ = ["label", "names_by_id", "qualified_name", "root_scope"]

_CALL_CODES = frozenset(
    code
    for code in (
        getattr(nn.Module, "_call_impl", None).__code__,  # type: ignore[union-attr]
        getattr(getattr(nn.Module, "_wrapped_call_impl", None), "__code__", None),
    )
    if code is not None
)

_ROOT: ContextVar[nn.Module | None] = ContextVar("deferinit_root", default=None)


@contextlib.contextmanager
def root_scope(root: nn.Module) -> Iterator[None]:
    """Name layers relative to ``root`` (used by ``di.*`` calls that know it)."""
    token = _ROOT.set(root)
    try:
        yield
    finally:
        _ROOT.reset(token)


def _calling_roots() -> list[nn.Module]:
    """The models a layer may be named below, best first: the one a ``di.*`` call
    named, else the outermost module being called, else the outermost module
    whose own method is running (``net.to(...)``, ``net.apply(fn)``), then the
    inner ones."""
    root = _ROOT.get()
    if root is not None:
        return [root]
    frame = sys._getframe(1)
    called: list[nn.Module] = []
    methods: list[nn.Module] = []
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, nn.Module):
                (called if code in _CALL_CODES else methods).append(candidate)
        frame = frame.f_back  # type: ignore[assignment]
    return [*called[::-1], *methods[::-1]]


def qualified_name(module: nn.Module, root: nn.Module | None = None) -> str | None:
    """The path of ``module`` below ``root`` (or below the model being called, or
    whose method is running: see :func:`_calling_roots`).

    ``""`` when ``module`` is the root itself; ``None`` when it cannot be found.
    """
    roots = [root] if root is not None else _calling_roots()
    seen: set[int] = set()
    for candidate in roots:
        if id(candidate) in seen:
            continue
        seen.add(id(candidate))
        name = names_by_id(candidate).get(id(module))
        if name is not None:
            return name
    return None


def names_by_id(root: nn.Module) -> dict[int, str]:
    """Every module below ``root`` (``root`` itself as ``""``) by ``id``, under
    its qualified name; a module reachable by several paths goes by the first, as
    ``named_modules`` lists it.

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> net.append(net[0])  # doctest: +ELLIPSIS
    Sequential(...)
    >>> names = names_by_id(net)
    >>> names[id(net)], names[id(net[0])]
    ('', '0')
    """
    names: dict[int, str] = {}
    for name, sub in root.named_modules(remove_duplicate=False):
        names.setdefault(id(sub), name)
    return names


def label(module: nn.Module, class_name: str | None = None) -> str:
    """``"Linear layer '0'"``: the class and, when known, the qualified name."""
    kind = class_name or type(module).__name__
    name = qualified_name(module)
    if name:
        return f"{kind} layer {name!r}"
    return f"{kind} layer"
