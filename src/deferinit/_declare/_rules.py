"""Inference rules: how a constructor argument is read off the forward arguments.

A rule is evaluated once, when a deferred layer builds (and again only to explain
an error). It never runs on the normal forward path.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from .._errors import ArgumentsError

__all__ = [
    "MISSING",
    "Call",
    "Described",
    "Rule",
    "RuleError",
    "argument_name",
    "as_rule",
    "describe",
    "dim",
    "size_at",
    "tensor_argument",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""Sentinel: a value that is not known without an input."""


class RuleError(Exception):
    """Raised by a rule; the deferred layer turns it into an ``InferenceError``
    that names the layer. ``expected`` and ``got`` complete the sentence
    "expected ..., got ...".
    """

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got


class Call:
    """The arguments of one forward call, addressable by position or by name."""

    __slots__ = ("_signature", "args", "kwargs")

    def __init__(
        self,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        signature: inspect.Signature | Callable[[], inspect.Signature | None] | None,
    ) -> None:
        self.args = args
        self.kwargs = kwargs
        # A callable: the signature is worked out only if a name must be resolved
        # (inspect.signature costs tens of microseconds the first time a class
        # builds; most rules read a positional argument).
        self._signature = signature

    @property
    def signature(self) -> inspect.Signature | None:
        signature = self._signature
        if callable(signature):
            signature = self._signature = signature()
        return signature

    def get(self, arg: int | str) -> Any:
        if isinstance(arg, int):
            if arg < len(self.args):
                return self.args[arg]
            name = self._name_of(arg)
            if name is not None and name in self.kwargs:
                return self.kwargs[name]
            raise RuleError(
                f"forward argument {arg}", f"only {len(self.args)} positional argument(s)"
            )
        if arg in self.kwargs:
            return self.kwargs[arg]
        position = self._position_of(arg)
        if position is not None and position < len(self.args):
            return self.args[position]
        raise RuleError(f"forward argument {arg!r}", "a call without it")

    def _names(self) -> list[str]:
        if self.signature is None:
            return []
        return [
            p.name
            for p in self.signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def _name_of(self, position: int) -> str | None:
        names = self._names()
        return names[position] if position < len(names) else None

    def _position_of(self, name: str) -> int | None:
        names = self._names()
        return names.index(name) if name in names else None


def _shape_text(x: torch.Tensor) -> str:
    """``x``'s shape as a tuple; torch's older (strided) nested layout has no
    ``.shape``: its ragged dimensions show as ``*``."""
    if not (x.is_nested and x.layout is torch.strided):
        return str(tuple(x.shape))
    sizes = []
    for axis in range(x.dim()):
        try:
            sizes.append(str(x.size(axis)))
        except RuntimeError:
            sizes.append("*")
    return f"({', '.join(sizes)})"


def describe(value: Any) -> str:
    """``value`` for an error message: tensors by shape and dtype, anything else by
    type and a bounded repr (fast for a list of a million items, and safe for an
    object whose ``repr`` raises)."""
    if isinstance(value, torch.Tensor):
        nested = "nested " if value.is_nested else ""
        return f"{_DTYPE_TEXT[value.dtype]} {nested}tensor of shape {_shape_text(value)}"
    if isinstance(value, PackedSequence):
        return f"a PackedSequence with data of shape {tuple(value.data.shape)}"
    kind = type(value).__name__
    if isinstance(value, list | tuple | dict | set | frozenset | str | bytes):
        unit = (
            "character"
            if isinstance(value, str)
            else "byte"
            if isinstance(value, bytes)
            else "item"
        )
        kind = f"{kind} of {len(value)} {unit}{'' if len(value) == 1 else 's'}"
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind} ({_REPR.repr(value)})"


class Described:
    """A plain tensor input as :func:`describe` words it, worded only when shown
    (a build keeps where its sizes came from for messages it will most likely never
    show). Holds the dtype and shape only, never the tensor.

    >>> import torch
    >>> str(Described(torch.zeros(2, 3)))
    'a float32 tensor of shape (2, 3)'
    """

    __slots__ = ("dtype", "shape")

    def __init__(self, value: torch.Tensor) -> None:
        self.dtype = value.dtype
        self.shape = tuple(value.shape)  # a plain tuple of ints: the collector lets it be

    def __str__(self) -> str:
        return f"{_DTYPE_TEXT[self.dtype]} tensor of shape {tuple(self.shape)}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return repr(str(self))

    def __eq__(self, other: object) -> bool:
        return str(self) == (str(other) if isinstance(other, Described) else other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))  # pickles as the text it stands for


class _DtypeText(dict[torch.dtype, str]):
    """``"a float32"``, ``"an int64"``: a dtype with its article, written once
    (a build describes its input for messages it will most likely never show)."""

    def __missing__(self, dtype: torch.dtype) -> str:
        name = str(dtype).removeprefix("torch.")
        self[dtype] = text = f"{'an' if name.startswith('int') else 'a'} {name}"
        return text


_DTYPE_TEXT = _DtypeText()


class _BoundedRepr(reprlib.Repr):
    """reprlib's bounded repr; an object whose repr raises shows as its type."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = 60
        self.maxlong = 40

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            text = repr(x)
        except Exception:  # the user's __repr__: the message must still be written
            return f"<{type(x).__name__} object>"
        if len(text) > self.maxother:
            return text[: self.maxother - 3] + "..."
        return text


_REPR = _BoundedRepr()


def size_at(x: torch.Tensor, axis: int) -> int:
    """``x.shape[axis]`` as an int; a ragged dimension of a nested tensor has none."""
    if x.is_nested and x.layout is torch.strided:
        # torch's older nested layout has no .shape at all, only the regular sizes
        try:
            return int(x.size(axis))
        except RuntimeError:
            raise RuleError(
                f"a regular size on axis {axis} (a ragged dimension of a nested tensor "
                f"cannot become a layer size)",
                describe(x),
            ) from None
    size = x.shape[axis]
    if isinstance(size, torch.SymInt) and size.node.is_nested_int():
        raise RuleError(
            f"a regular size on axis {axis} (a ragged dimension of a nested tensor cannot "
            f"become a layer size)",
            describe(x),
        )
    return int(size)


class Rule:
    """How one constructor argument is inferred.

    Subclasses implement :meth:`infer`. ``options`` are extra constructor keywords
    that the rule consumes (with their defaults), e.g. ``ndim`` for LayerNorm.
    :func:`deferinit.dim` makes the common one.

    >>> import torch, deferinit as di
    >>> rule = di.dim(1)  # the size of dimension 1 of forward argument 0
    >>> isinstance(rule, di.Rule)
    True
    >>> Linear = di.defer(torch.nn.Linear, in_features=rule)
    >>> Linear(out_features=2)(torch.randn(4, 3)).shape
    torch.Size([4, 2])
    """

    options: Mapping[str, Any] = {}

    def infer(self, call: Call, options: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def static(self, options: Mapping[str, Any], explicit: Mapping[str, Any]) -> Any:
        """The value when the options (and the explicitly given sizes) alone
        determine it, else ``MISSING``."""
        return MISSING

    def provisional(self, size: int, options: Mapping[str, Any]) -> Any:
        """A stand-in value used to construct the layer on ``meta`` before build."""
        return size

    def from_shapes(self, shapes: Mapping[str, tuple[int, ...]], options: Mapping[str, Any]) -> Any:
        """The value read directly off a checkpoint's tensor shapes (by name within
        the layer), ``MISSING`` to solve it from how the shapes move with it, or
        raise ``RuleError`` when a checkpoint cannot tell it."""
        return MISSING

    def describe(self) -> str:
        """Where the value comes from, for error messages."""
        return repr(self)

    def origin(self, forward: inspect.Signature | None) -> str:
        """:meth:`describe` for docstrings, naming the arguments of ``forward`` (the
        layer's forward signature without ``self``) as torch's docs do:
        "``input.shape[-1]``"."""
        return self.describe()


def argument_name(arg: int | str, forward: inspect.Signature | None) -> str | None:
    """The name a rule's forward argument goes by in docstrings, if ``forward`` tells it."""
    if isinstance(arg, str):
        return arg
    if forward is None:
        return None
    names = [
        p.name
        for p in forward.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return names[arg] if 0 <= arg < len(names) else None


def tensor_argument(call: Call, arg: int | str) -> torch.Tensor:
    """Forward argument ``arg`` as a tensor (a packed sequence's data), or a ``RuleError``."""
    value = call.get(arg)
    if isinstance(value, PackedSequence):
        return value.data
    if not isinstance(value, torch.Tensor):
        raise RuleError(f"a tensor as forward argument {arg!r}", describe(value))
    return value


def _rank_text(ndim: tuple[int, ...]) -> str:
    if len(ndim) == 1:
        return f"a {ndim[0]}-d tensor"
    return "a " + " or ".join(f"{n}-d" for n in ndim) + " tensor"


@dataclass(frozen=True)
class dim(Rule):  # noqa: N801 - public name from the design contract
    """The rule "size of dimension ``axis`` of forward argument ``arg``".

    ``arg`` is a position or the name of a forward parameter. ``ndim`` restricts
    the accepted ranks (an int or a tuple of ints) so that a wrong rank gets a
    clear error instead of a size read from the wrong axis.

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> LazyLinear = di.defer(nn.Linear, in_features=di.dim(-1))
    >>> layer = LazyLinear(8)
    >>> layer(torch.randn(2, 5)).shape
    torch.Size([2, 8])
    """

    axis: int
    arg: int | str = 0
    ndim: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Checked here, at the declaration, not at the first forward far from it.
        def whole(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        ndim = self.ndim
        problem = (
            f"axis must be an int, got {self.axis!r}"
            if not whole(self.axis)
            else f"arg must be a position (int) or a forward parameter's name, got {self.arg!r}"
            if not (whole(self.arg) or isinstance(self.arg, str))
            else f"ndim must be an int or a tuple of ints, got {ndim!r}"
            if not (
                ndim is None
                or whole(ndim)
                or (isinstance(ndim, tuple) and ndim and all(whole(n) for n in ndim))
            )
            else None
        )
        if problem is not None:
            raise ArgumentsError(f"di.dim: {problem}. Fix: e.g. di.dim(-1) or di.dim(1, arg='x').")

    def infer(self, call: Call, options: Mapping[str, Any]) -> int:
        args, arg = call.args, self.arg
        if type(arg) is int and -1 < arg < len(args):
            x = args[arg]
            if type(x) is torch.Tensor and not x.is_nested:  # the common call: plain sizes
                shape, axis, ndim = x.shape, self.axis, self.ndim
                rank = len(shape)
                if (
                    (ndim is None or rank == ndim or (type(ndim) is tuple and rank in ndim))
                    and -rank <= axis < rank
                    and shape[axis] > 0
                ):
                    return int(shape[axis])
        x = tensor_argument(call, self.arg)
        ranks = (self.ndim,) if isinstance(self.ndim, int) else self.ndim
        if ranks is not None and x.dim() not in ranks:
            raise RuleError(_rank_text(ranks), describe(x))
        need = self.axis + 1 if self.axis >= 0 else -self.axis
        if x.dim() < need:
            raise RuleError(f"a tensor with at least {need} dimension(s)", describe(x))
        size = size_at(x, self.axis)
        if size <= 0:
            raise RuleError(
                f"a non-zero size on axis {self.axis} (it becomes a layer size)", describe(x)
            )
        return size

    def describe(self) -> str:
        return f"size of axis {self.axis} of forward argument {self.arg!r}"

    def origin(self, forward: inspect.Signature | None) -> str:
        name = argument_name(self.arg, forward)
        where = self.describe() if name is None else f"``{name}.shape[{self.axis}]``"
        if self.ndim is None:
            return where
        ranks = (self.ndim,) if isinstance(self.ndim, int) else self.ndim
        return f"{where} ({_rank_text(ranks).removeprefix('a ')} only)"


@dataclass(frozen=True)
class _Function(Rule):
    """A user's callable of the forward arguments, e.g. ``lambda x: 2 * x.shape[-1]``."""

    fn: Callable[..., Any]

    def infer(self, call: Call, options: Mapping[str, Any]) -> Any:
        try:
            value = self.fn(*call.args, **call.kwargs)
        except Exception as error:  # the user's code: report it with the layer name
            raise RuleError(
                f"the rule {getattr(self.fn, '__name__', self.fn)!r} to accept the input",
                f"{type(error).__name__}: {error}",
            ) from error
        if isinstance(value, torch.Tensor):  # x.shape[-1] * torch.ones(()): a size is a number
            raise RuleError(
                "a size as a Python number (e.g. x.shape[-1]) from the rule, not a tensor",
                describe(value),
            )
        if isinstance(value, bool) or not isinstance(value, int | tuple | list):
            return value
        if isinstance(value, int) and value <= 0:
            raise RuleError("a positive size from the rule", repr(value))
        return value

    def describe(self) -> str:
        return f"rule {getattr(self.fn, '__name__', _REPR.repr(self.fn))}"


def as_rule(rule: Rule | Callable[..., Any]) -> Rule:
    """Accept a :class:`Rule` or any callable of the forward arguments."""
    if isinstance(rule, Rule):
        return rule
    if callable(rule):
        return _Function(rule)
    raise ArgumentsError(
        f"a deferinit rule must be di.dim(axis, arg=...) or a callable of the forward "
        f"arguments, got {type(rule).__name__} {rule!r}. Fix: e.g. in_features=di.dim(-1)."
    )
