"""Learning what a layer will own before its sizes are known.

The names, dtypes and ``requires_grad`` flags of every parameter and buffer, and
the submodule tree that ``state_dict`` keys will follow, are what a placeholder
needs at once. For the common ``torch.nn`` layers they follow from the
constructor arguments alone (:data:`KNOWN`, checked against torch's classes by
the tests). Any other class is constructed on ``meta`` with provisional sizes:
that costs no memory and no random numbers. Layouts are cached by the declared
arguments, so declaring the same layer again constructs nothing.

The provisional shapes and ``extra_repr`` (for checkpoint inference and reprs)
come from that meta construction too; a known layout makes it only when first
asked, since most models are built before anyone prints or loads them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from .._errors import ArgumentsError
from .._tensors import construct_on_meta
from ._signature import constructor_args_of, constructor_call, qualname
from ._state import State, declared_defaults

if TYPE_CHECKING:
    from ._deferred import Deferred

__all__ = [
    "KNOWN",
    "LAYOUT_CACHE_SIZE",
    "NOT_PLAIN",
    "PROVISIONAL_LIMIT",
    "PROVISIONAL_SIZES",
    "Layout",
    "TensorSpec",
    "freeze",
    "layout_of",
    "probe_layout",
    "probe_shapes",
    "provisional_constructor",
    "provisional_sizes",
    "quiet",
]

# Stand-in sizes, tried in order. 1009 is prime, so it rarely collides with a
# real argument when the repr replaces it by "?"; the multiples satisfy the
# divisibility checks of layers such as MultiheadAttention (embed_dim % num_heads)
# and GroupNorm (num_channels % num_groups): 2520 divides by 1..10 and 12, 40320 by
# every power of two up to 128. On meta none of this allocates.
PROVISIONAL_SIZES = (1009, 1009 * 2520, 1009 * 40320)
# When none of those constructs (a head count of 11, 13, 25 or 256), 1009 times the
# lcm of the integers the declaration gives, then times each of them, up to this
# size (beyond it a stand-in squared, as an attention layer's weights are, nears
# int64's numel limit on meta).
PROVISIONAL_LIMIT = 1009 * 2**17


def provisional_sizes(given: Iterable[Any]) -> tuple[int, ...]:
    """The stand-in sizes to try, in order, for a declaration that gives these
    argument values: :data:`PROVISIONAL_SIZES`, then multiples of 1009 that every
    (else each) positive integer among them divides, for the divisibility checks
    no fixed stand-in satisfies.

    >>> provisional_sizes([11, True, "relu"])[3:]
    (11099,)
    >>> provisional_sizes([0.1])
    (1009, 2542680, 40682880)
    """
    ints = sorted({v for v in given if type(v) is int and v > 1})
    if not ints:
        return PROVISIONAL_SIZES
    sizes = list(PROVISIONAL_SIZES)
    for n in (math.lcm(*ints), *ints):
        size = 1009 * n
        if size <= PROVISIONAL_LIMIT and size not in sizes:
            sizes.append(size)
    return tuple(sizes)


# One "ignore" filter for every quiet section, however they overlap across threads
# (catch_warnings saves and restores the whole filter list, so two overlapping in
# two threads could leave warnings ignored for good).
_QUIET = threading.Lock()
_QUIET_DEPTH = 0
_QUIET_FILTER: tuple[Any, ...] = ("ignore", None, Warning, None, 0)


def _filters() -> list[Any]:
    return warnings.filters  # type: ignore[return-value]  # a list, typed as a Sequence


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Ignore warnings in the constructions that only probe a layer (on meta, in a
    shape pass), so that the user sees eager's warnings once, at the real
    construction (and, under ``-W error``, its error there, not a refused probe).

    >>> with quiet():
    ...     warnings.warn("not shown")
    """
    global _QUIET_DEPTH
    with _QUIET:
        if _QUIET_DEPTH == 0:
            _filters().insert(0, _QUIET_FILTER)
            warnings._filters_mutated()  # type: ignore[attr-defined]
        _QUIET_DEPTH += 1
    try:
        yield
    finally:
        with _QUIET:
            _QUIET_DEPTH -= 1
            if _QUIET_DEPTH == 0:
                filters = _filters()
                for i, item in enumerate(filters):
                    if item is _QUIET_FILTER:
                        del filters[i]
                        break
                warnings._filters_mutated()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TensorSpec:
    """One parameter or buffer the built layer will own."""

    name: str  # qualified within the layer, e.g. "out_proj.weight"
    is_parameter: bool
    dtype: torch.dtype | None  # None: the layer registers None under this name
    requires_grad: bool
    persistent: bool


@dataclass(frozen=True)
class Probed:
    """What the meta construction at a provisional size shows."""

    size: int  # the provisional size that constructed
    first_repr: str | None  # extra_repr at the provisional size, if the class has one
    shapes: Mapping[str, tuple[int, ...]]  # provisional shapes, for checkpoint inference


class Layout:
    """Everything a placeholder needs to stand in for the layer.

    ``size``, ``first_repr`` and ``shapes`` come from a meta construction
    (:class:`Probed`), made when first read where the layout was known without one.
    """

    __slots__ = ("_examples", "_probe", "_probed", "_repr_text", "modules", "tensors")

    def __init__(
        self,
        tensors: tuple[TensorSpec, ...],
        modules: tuple[str, ...],  # qualified submodule names, registration order
        probed: Probed | Callable[[], Probed],
    ) -> None:
        self.tensors = tensors
        self.modules = modules
        self._probed = probed if isinstance(probed, Probed) else None
        self._probe = None if isinstance(probed, Probed) else probed
        self._repr_text: str | None = None
        self._examples: tuple[nn.Module, nn.Module | None] | None = None

    def probed(self) -> Probed:
        """The meta construction's facts, made now if not yet."""
        found = self._probed
        if found is None:
            assert self._probe is not None  # one of the two is always set
            self._probed = found = self._probe()
        return found

    @property
    def size(self) -> int:
        return self.probed().size

    @property
    def first_repr(self) -> str | None:
        return self.probed().first_repr

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self.probed().shapes

    def __reduce__(self) -> Any:
        # Pickled and copied with what the meta construction shows, not how to make it.
        return (Layout, (self.tensors, self.modules, self.probed()))

    def __repr__(self) -> str:
        return f"Layout(tensors={self.tensors!r}, modules={self.modules!r})"

    def repr_text(self, construct: Callable[[int], nn.Module]) -> str | None:
        """``extra_repr`` with ``?`` for every number that moves with the stand-in
        size: worked out on first use (it constructs the layer once more), since
        most models are built before anyone prints them."""
        cached = self._repr_text
        if cached is None and self.first_repr is not None:
            self._repr_text = cached = _repr_text(self.first_repr, construct, self.size)
        return cached

    def attribute(
        self,
        path: str,
        name: str,
        construct: Callable[[int], nn.Module],
        spread: Callable[[int], nn.Module],
    ) -> Any:
        """The plain attribute ``name`` of the built layer's submodule ``path``, as
        two meta constructions at different stand-in sizes (``spread`` giving each
        inferred argument its own) both show it; :data:`NOT_PLAIN` where they differ
        (it depends on a size) or it is not a plain value; raise ``AttributeError``
        where the built layer has none. Constructed on the first such read only:
        every other read answers from the placeholder itself."""
        examples = self._examples
        if examples is None:
            self._examples = examples = _examples(self.size, construct, spread)
        values = []
        for example in examples:
            if example is None:  # no second size constructs: nothing tells
                return NOT_PLAIN
            values.append(getattr(example.get_submodule(path), name))
        first, second = values
        if not _plain(first) or type(first) is not type(second) or first != second:
            return NOT_PLAIN
        return first


# What Layout.attribute answers for a value the placeholder cannot know.
NOT_PLAIN: Any = object()

_PLAIN = frozenset({bool, int, float, complex, str, type(None), torch.dtype, torch.device})


def _plain(value: Any) -> bool:
    """A value that a construction shares with no other: a scalar, a tuple of them, a
    function (``activation``); a tensor, a module or a mutable container is not."""
    if type(value) in _PLAIN:
        return True
    if type(value) is tuple:
        return all(_plain(v) for v in value)
    return isinstance(value, types.FunctionType | types.BuiltinFunctionType)


def _examples(
    size: int, construct: Callable[[int], nn.Module], spread: Callable[[int], nn.Module]
) -> tuple[nn.Module, nn.Module | None]:
    with quiet():
        first = construct_on_meta(functools.partial(construct, size))
        for make in (spread, construct):
            try:
                return first, construct_on_meta(functools.partial(make, 2 * size))
            except Exception:  # a stand-in this class refuses: try the next
                continue
    return first, None


# The tensors of torch layers whose layout follows from their arguments alone, in
# registration order: (name, is a parameter, the flag arguments that must all be
# true for it to exist (else the layer registers None there), holds a count
# (torch.long, whatever the dtype)). A flag the class does not take is true, as in
# torch's shared base classes (_NormBase's ``bias``). tests/test_known_layouts.py
# holds each row against the class constructed on meta.
Row = tuple[str, bool, tuple[str, ...], bool]
_WEIGHT_BIAS: tuple[Row, ...] = (("weight", True, (), False), ("bias", True, ("bias",), False))
_NORM: tuple[Row, ...] = (
    ("weight", True, ("affine",), False),
    ("bias", True, ("affine", "bias"), False),
    ("running_mean", False, ("track_running_stats",), False),
    ("running_var", False, ("track_running_stats",), False),
    ("num_batches_tracked", False, ("track_running_stats",), True),
)
_AFFINE: tuple[Row, ...] = (
    ("weight", True, ("elementwise_affine",), False),
    ("bias", True, ("elementwise_affine", "bias"), False),
)
KNOWN: dict[type[nn.Module], tuple[Row, ...]] = {
    nn.Linear: _WEIGHT_BIAS,
    nn.Bilinear: _WEIGHT_BIAS,
    nn.Conv1d: _WEIGHT_BIAS,
    nn.Conv2d: _WEIGHT_BIAS,
    nn.Conv3d: _WEIGHT_BIAS,
    nn.ConvTranspose1d: _WEIGHT_BIAS,
    nn.ConvTranspose2d: _WEIGHT_BIAS,
    nn.ConvTranspose3d: _WEIGHT_BIAS,
    nn.BatchNorm1d: _NORM,
    nn.BatchNorm2d: _NORM,
    nn.BatchNorm3d: _NORM,
    nn.SyncBatchNorm: _NORM,
    nn.InstanceNorm1d: _NORM,
    nn.InstanceNorm2d: _NORM,
    nn.InstanceNorm3d: _NORM,
    nn.GroupNorm: (("weight", True, ("affine",), False), ("bias", True, ("affine", "bias"), False)),
    nn.LayerNorm: _AFFINE,
    nn.RMSNorm: _AFFINE[:1],
    nn.PReLU: (("weight", True, (), False),),
}


def _known_layout(cls: type[Deferred], state: State) -> Layout | None:
    """The layout of a layer of :data:`KNOWN`, from its arguments; else None."""
    real = cls._di_cls
    rows = KNOWN.get(real)
    if rows is None:
        return None
    arguments, signature = state.arguments, cls._di_init_signature.parameters
    flags = []
    for flag in sorted({f for _, _, needs, _ in rows for f in needs}):
        if flag in arguments:
            flags.append((flag, bool(arguments[flag])))
        else:  # a flag the class does not take is true (see KNOWN)
            parameter = signature.get(flag)
            flags.append((flag, True if parameter is None else bool(parameter.default)))
    dtype = arguments.get("dtype") or state.dtype
    tensors = _known_tensors(real, dtype, tuple(flags))  # type: ignore[arg-type]  # classes hash
    # The meta construction, made only when its facts are first read, as declared.
    snapshot = State(cls, dict(arguments), dict(state.options), dict(state.explicit))
    snapshot.dtype, snapshot.device = state.dtype, state.device
    return Layout(tensors, (), functools.partial(_probe_later, cls, snapshot))


@functools.lru_cache(maxsize=256)
def _known_tensors(
    real: type[nn.Module], dtype: torch.dtype, flags: tuple[tuple[str, bool], ...]
) -> tuple[TensorSpec, ...]:
    """The tensors of a :data:`KNOWN` class with these flags, in this dtype (the
    same for every size, so shared by every declaration)."""
    true = {flag for flag, value in flags if value}
    return tuple(
        TensorSpec(
            name,
            is_parameter,
            (torch.long if count else dtype) if true.issuperset(needs) else None,
            is_parameter and true.issuperset(needs),
            True,
        )
        for name, is_parameter, needs, count in KNOWN[real]
    )


def _probe_later(cls: type[Deferred], state: State) -> Probed:
    return _probe_declared(cls, state).probed()


# Lives as long as the process, so it must not grow with it: the layouts of the
# most recently declared arguments are kept.
_LAYOUTS: OrderedDict[Any, Layout] = OrderedDict()
LAYOUT_CACHE_SIZE = 256


def layout_of(cls: type[Deferred], state: State) -> Layout:
    """The layout of a declared layer, probed on meta once per distinct declaration."""
    key: Any
    try:
        key = (
            cls,
            state.dtype,
            _frozen(state.arguments),
            _frozen(state.options),
            _frozen(state.explicit),
        )
        layout = _LAYOUTS[key]
    except KeyError:
        pass
    except TypeError:
        key = None
    else:
        try:
            _LAYOUTS.move_to_end(key)
        except KeyError:  # another thread evicted it meanwhile
            pass
        return layout
    found = _known_layout(cls, state)
    if found is None:
        found = _probe_declared(cls, state)
    if key is not None:
        _LAYOUTS[key] = found
        while len(_LAYOUTS) > LAYOUT_CACHE_SIZE:
            try:
                _LAYOUTS.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
    return found


def _probe_declared(cls: type[Deferred], state: State) -> Layout:
    """Construct the declared layer on meta (as at its declaration), or raise."""
    found: Layout | None
    construct = provisional_constructor(cls, state)
    if state.dtype is torch.get_default_dtype():  # one device mode: each op pays for each
        found, error = probe_layout(construct)
    else:  # reset after the default dtype changed: probe as at the declaration
        with declared_defaults(state, "meta"):
            found, error = probe_layout(construct)
    if found is None:  # a divisibility check no fixed stand-in meets (nhead=11)
        sizes = provisional_sizes([*state.arguments.values(), *state.explicit.values()])
        if len(sizes) > len(PROVISIONAL_SIZES):
            with declared_defaults(state, "meta"):
                found, error = probe_layout(construct, sizes[len(PROVISIONAL_SIZES) :])
    if found is None:
        shown = ", ".join(constructor_args_of(cls, state))
        raise ArgumentsError(
            f"deferinit {cls.__name__}({shown}): {qualname(cls._di_cls)} rejects these "
            f"arguments whatever sizes are inferred (tried with stand-ins for the '?' "
            f"ones: {type(error).__name__}: {error}). Nothing was built. Fix the "
            f"constructor arguments."
        ) from error
    return found


def provisional_constructor(
    cls: type[Deferred], state: State, *, spread: bool = False
) -> Callable[[int], nn.Module]:
    """Constructs the real class with every inferred size set to a stand-in. With
    ``spread``, each inferred argument gets its own multiple of the size, and one
    whose stand-in does not move with the size (``kdim``'s ``None``) that multiple
    itself: a value that depends on how the inferred sizes relate then differs from
    the plain construction's."""
    arguments = dict(state.arguments)
    if "device" in arguments:
        arguments["device"] = "meta"

    def construct(size: int) -> nn.Module:
        values = dict(state.explicit)
        for i, (name, rule) in enumerate(cls._di_rules.items()):
            if name not in values:
                value = rule.provisional(size * (i + 1) if spread else size, state.options)
                if spread and i and value == rule.provisional(size, state.options):
                    value = size * (i + 1)
                values[name] = value
        args, kwargs = constructor_call(cls, arguments, values)
        return cls._di_cls(*args, **kwargs)

    return construct


def probe_layout(
    construct: Callable[[int], nn.Module],
    sizes: tuple[int, ...] = PROVISIONAL_SIZES,
) -> tuple[Layout | None, BaseException | None]:
    """Construct on meta with each provisional size until one works."""
    last: BaseException | None = None
    for size in sizes:
        try:
            with quiet():
                module = construct_on_meta(functools.partial(construct, size))
        except Exception as error:  # try the next stand-in size
            last = error
            continue
        return _read_layout(module, size, construct), None
    return None, last


def probe_shapes(construct: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of a meta construction (for checkpoint inference)."""
    with quiet():
        module = construct_on_meta(construct)
    return {
        name: tuple(t.shape) for name, t in [*module.named_parameters(), *module.named_buffers()]
    }


def _read_layout(module: nn.Module, size: int, construct: Callable[[int], nn.Module]) -> Layout:
    tensors: list[TensorSpec] = []
    shapes: dict[str, tuple[int, ...]] = {}
    modules: list[str] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if prefix:
            modules.append(prefix)
        dot = prefix + "." if prefix else ""
        for name, p in sub._parameters.items():
            tensors.append(_spec(dot + name, p, True, True))
            if p is not None and not isinstance(p, UninitializedTensorMixin):
                shapes[dot + name] = tuple(p.shape)
        for name, b in sub._buffers.items():
            persistent = name not in sub._non_persistent_buffers_set
            tensors.append(_spec(dot + name, b, False, persistent))
            if b is not None and not isinstance(b, UninitializedTensorMixin):
                shapes[dot + name] = tuple(b.shape)
    first = None
    if type(module).extra_repr is not nn.Module.extra_repr and not module._modules:
        first = module.extra_repr()
    return Layout(tuple(tensors), tuple(modules), Probed(size, first, shapes))


def _spec(name: str, t: torch.Tensor | None, is_parameter: bool, persistent: bool) -> TensorSpec:
    if t is None:
        return TensorSpec(name, is_parameter, None, False, persistent)
    return TensorSpec(name, is_parameter, t.dtype, t.requires_grad, persistent)


def _repr_text(text: str, construct: Callable[[int], nn.Module], size: int) -> str:
    """``text`` with ``?`` for every number that moves with the stand-in size.

    A second construction at twice the size tells which numbers are unknown, so a
    real argument that happens to equal the stand-in still shows.
    """
    with quiet():
        other = construct_on_meta(functools.partial(construct, 2 * size)).extra_repr()
    ours, theirs = re.split(r"(\d+)", text), re.split(r"(\d+)", other)
    if len(ours) != len(theirs):
        return re.sub(rf"\b{size}\b", "?", text)
    return "".join("?" if a != b else a for a, b in zip(ours, theirs, strict=True))


_SCALARS = frozenset({int, bool, float, str, type(None)})


def _frozen(arguments: dict[str, Any]) -> Any:
    """:func:`freeze` of a dict of arguments, without a call per argument when each
    is a plain scalar (most declarations); the same key either way."""
    for value in arguments.values():
        if type(value) not in _SCALARS:
            return freeze(arguments)
    return tuple([(k, (type(v), v)) for k, v in arguments.items()])


def freeze(value: Any) -> Any:
    """A hashable key for a constructor argument, or raise TypeError."""
    if isinstance(value, dict):
        return tuple((k, freeze(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(freeze(v) for v in value))
    hash(value)
    return (type(value), value)
