"""Deferred twins of every ``torch.nn`` layer whose constructor takes a size that
the input determines.

Each twin takes torch's arguments, with torch's names and defaults, minus the
inferred ones; positional arguments skip the inferred ones (``Linear(256)`` means
``out_features=256``). Passing an inferred argument by keyword builds at once.
After the first forward the object *is* the torch layer (``type(m) is
torch.nn.Linear``).

``TWINS`` is the table the twins are made from; the tests read it too. Adding a
twin touches this file only: its entry in ``TWINS``, its ``_twin`` line at the end
and its name in ``__all__``; a rule that ``di.dim`` cannot express goes beside
``Trailing`` and ``PerChannel`` below.

``RANK_GENERIC`` makes ``Conv``, ``ConvTranspose``, ``BatchNorm`` and
``InstanceNorm``: they also infer ``spatial_dims`` from a batched input's rank and
become exactly the 1d, 2d or 3d torch class (``dnn.Conv(16, 3)`` fed ``(N, C, H,
W)`` becomes an ``nn.Conv2d``).

>>> import torch
>>> from deferinit import nn as dnn
>>> layer = dnn.Linear(256)
>>> layer
Linear(in_features=?, out_features=256, bias=True)
>>> layer(torch.randn(2, 20)).shape
torch.Size([2, 256])
>>> layer
Linear(in_features=20, out_features=256, bias=True)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch import nn as _nn

from ._declare._deferred import Deferred, make_deferred
from ._declare._layout import NOT_PLAIN
from ._declare._placeholder import layer_attribute
from ._declare._rules import (
    MISSING,
    Call,
    Rule,
    RuleError,
    argument_name,
    describe,
    dim,
    size_at,
    tensor_argument,
)
from ._declare._signature import constructor_args_of, forward_signature, public_signature
from ._errors import ArgumentsError, InferenceError, NotBuiltError
from ._naming import label

__all__ = [
    "RANK_GENERIC",
    "TWINS",
    "AdaptiveLogSoftmaxWithLoss",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Bilinear",
    "Conv",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "GRU",
    "GRUCell",
    "GroupNorm",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LSTM",
    "LSTMCell",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "PReLU",
    "RMSNorm",
    "RNN",
    "RNNCell",
    "SyncBatchNorm",
    "Transformer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]


# The rules torch layers need beyond ``di.dim``.


@dataclass(frozen=True)
class Trailing(Rule):
    """``normalized_shape`` of LayerNorm/RMSNorm: the last ``ndim`` sizes (option, default 1)."""

    options = {"ndim": 1}  # unannotated: a class attribute, not a dataclass field

    def infer(self, call: Call, options: Mapping[str, Any]) -> tuple[int, ...]:
        k = _ndim(options)
        x = tensor_argument(call, 0)
        if x.dim() < k:
            raise RuleError(f"a tensor with at least {k} dimension(s) (ndim={k})", describe(x))
        shape = tuple(size_at(x, axis) for axis in range(-k, 0))
        if 0 in shape:
            raise RuleError(
                "non-zero trailing sizes (they become the normalized shape)", describe(x)
            )
        return shape

    def provisional(self, size: int, options: Mapping[str, Any]) -> tuple[int, ...]:
        return (size,) * _ndim(options)

    def describe(self) -> str:
        return "the last ndim sizes of the input"

    def origin(self, forward: inspect.Signature | None) -> str:
        name = argument_name(0, forward) or "input"
        return f"``{name}.shape[-ndim:]`` (``ndim``: keyword, default 1)"


def _ndim(options: Mapping[str, Any]) -> int:
    k = options["ndim"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ArgumentsError(
            f"ndim must be a positive int (how many trailing dimensions), got {k!r}. Fix: "
            f"e.g. ndim=1 to normalize over the last dimension."
        )
    return k


@dataclass(frozen=True)
class PerChannel(Rule):
    """PReLU's ``num_parameters``: 1, or with ``per_channel=True`` the channel size
    (axis 1; 1 for inputs of fewer than 2 dimensions, as torch defines it)."""

    options = {"per_channel": False}

    def static(self, options: Mapping[str, Any], explicit: Mapping[str, Any]) -> Any:
        return MISSING if options["per_channel"] else 1

    def infer(self, call: Call, options: Mapping[str, Any]) -> int:
        x = tensor_argument(call, 0)
        if not options["per_channel"] or x.dim() < 2:
            return 1
        size = size_at(x, 1)
        if size == 0:
            raise RuleError("a non-zero channel size on axis 1", describe(x))
        return size

    def describe(self) -> str:
        return "the channel size (axis 1)"

    def origin(self, forward: inspect.Signature | None) -> str:
        name = argument_name(0, forward) or "input"
        return f"``{name}.shape[1]`` with ``per_channel=True`` (keyword), else 1"


@dataclass(frozen=True)
class SizeIfDiffers(Rule):
    """MultiheadAttention's ``kdim``/``vdim``: the last size of ``arg`` when it
    differs from that of ``ref``, else ``None`` (torch's "same as embed_dim")."""

    arg: str
    ref: str
    ref_name: str

    def static(self, options: Mapping[str, Any], explicit: Mapping[str, Any]) -> Any:
        # embed_dim given explicitly: as eager torch, kdim/vdim default to it.
        return None if self.ref_name in explicit else MISSING

    def infer(self, call: Call, options: Mapping[str, Any]) -> int | None:
        size = self._last(call, self.arg)
        if size == 0:
            raise RuleError(f"a non-zero last size of {self.arg}", describe(call.get(self.arg)))
        return None if size == self._last(call, self.ref) else size

    @staticmethod
    def _last(call: Call, arg: str) -> int:
        x = tensor_argument(call, arg)
        if x.dim() == 0:
            raise RuleError(f"{arg} with at least 1 dimension", describe(x))
        return size_at(x, -1)

    def provisional(self, size: int, options: Mapping[str, Any]) -> None:
        return None

    def from_shapes(self, shapes: Mapping[str, tuple[int, ...]], options: Mapping[str, Any]) -> Any:
        # A checkpoint of separate projections (kdim/vdim set) holds k_proj_weight and
        # v_proj_weight, of shape (embed_dim, kdim/vdim); a packed one holds neither.
        saved = shapes.get(f"{self.arg[0]}_proj_weight")
        if saved is None:
            return MISSING
        if len(saved) != 2:
            raise RuleError(f"{self.arg[0]}_proj_weight of 2 dimensions", str(saved))
        return saved[1]

    def describe(self) -> str:
        return f"the last size of {self.arg}, when it differs from {self.ref}'s"

    def origin(self, forward: inspect.Signature | None) -> str:
        return f"``{self.arg}.shape[-1]`` when it differs from ``{self.ref}.shape[-1]``, else None"


def _channels(n: int) -> dim:
    """Channel axis of an n-d conv-style input: (N, C, *spatial) or unbatched (C, *spatial)."""
    return dim(-(n + 1), ndim=(n + 1, n + 2))


# torch class -> rules for the arguments the input determines.
TWINS: dict[type[_nn.Module], dict[str, Rule]] = {
    _nn.Linear: {"in_features": dim(-1)},
    _nn.Bilinear: {"in1_features": dim(-1, arg=0), "in2_features": dim(-1, arg=1)},
    _nn.Conv1d: {"in_channels": _channels(1)},
    _nn.Conv2d: {"in_channels": _channels(2)},
    _nn.Conv3d: {"in_channels": _channels(3)},
    _nn.ConvTranspose1d: {"in_channels": _channels(1)},
    _nn.ConvTranspose2d: {"in_channels": _channels(2)},
    _nn.ConvTranspose3d: {"in_channels": _channels(3)},
    _nn.BatchNorm1d: {"num_features": dim(1, ndim=(2, 3))},
    _nn.BatchNorm2d: {"num_features": dim(1, ndim=4)},
    _nn.BatchNorm3d: {"num_features": dim(1, ndim=5)},
    _nn.SyncBatchNorm: {"num_features": dim(1)},
    _nn.InstanceNorm1d: {"num_features": dim(-2, ndim=(2, 3))},
    _nn.InstanceNorm2d: {"num_features": dim(-3, ndim=(3, 4))},
    _nn.InstanceNorm3d: {"num_features": dim(-4, ndim=(4, 5))},
    _nn.GroupNorm: {"num_channels": dim(1)},
    _nn.LayerNorm: {"normalized_shape": Trailing()},
    _nn.RMSNorm: {"normalized_shape": Trailing()},
    _nn.PReLU: {"num_parameters": PerChannel()},
    _nn.RNN: {"input_size": dim(-1, ndim=(2, 3))},
    _nn.LSTM: {"input_size": dim(-1, ndim=(2, 3))},
    _nn.GRU: {"input_size": dim(-1, ndim=(2, 3))},
    _nn.RNNCell: {"input_size": dim(-1, ndim=(1, 2))},
    _nn.LSTMCell: {"input_size": dim(-1, ndim=(1, 2))},
    _nn.GRUCell: {"input_size": dim(-1, ndim=(1, 2))},
    _nn.MultiheadAttention: {
        "embed_dim": dim(-1, arg="query", ndim=(2, 3)),
        "kdim": SizeIfDiffers("key", "query", "embed_dim"),
        "vdim": SizeIfDiffers("value", "query", "embed_dim"),
    },
    # forward(src, tgt): src is (S, E), (S, N, E) or with batch_first (N, S, E); E last.
    _nn.Transformer: {"d_model": dim(-1, arg="src", ndim=(2, 3))},
    _nn.TransformerEncoderLayer: {"d_model": dim(-1, arg="src", ndim=(2, 3))},
    _nn.TransformerDecoderLayer: {"d_model": dim(-1, arg="tgt", ndim=(2, 3))},
    _nn.AdaptiveLogSoftmaxWithLoss: {"in_features": dim(-1, ndim=(1, 2))},
}


def _rnn_signature(
    *, after_layers: tuple[str, object] | None = None, last: tuple[str, object] | None = None
) -> inspect.Signature:
    # torch's RNN/LSTM/GRU declare only (*args, **kwargs); these are their documented arguments.
    empty = inspect.Parameter.empty
    names: list[tuple[str, object]] = [
        ("input_size", empty),
        ("hidden_size", empty),
        ("num_layers", 1),
    ]
    names += [after_layers] if after_layers else []
    names += [("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)]
    names += [last] if last else []
    names += [("device", None), ("dtype", None)]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([inspect.Parameter(n, kind, default=d) for n, d in names])


_SIGNATURES = {
    _nn.RNN: _rnn_signature(after_layers=("nonlinearity", "tanh")),
    _nn.LSTM: _rnn_signature(last=("proj_size", 0)),
    _nn.GRU: _rnn_signature(),
}


def _example(name: str, twin: type[Deferred]) -> str:
    """A runnable example for a twin's docstring: the arguments it takes (torch's,
    minus the inferred ones), computed from the twin itself so it cannot drift."""
    taken = list(inspect.signature(twin).parameters)
    return (
        f"\nExample (the arguments it takes)::\n\n"
        f"    >>> import inspect\n"
        f"    >>> from deferinit import nn as dnn\n"
        f"    >>> list(inspect.signature(dnn.{name}).parameters)\n"
        f"    {taken!r}\n"
    )


def _docstring(cls: type[_nn.Module], twin: type[Deferred]) -> str:
    forward = forward_signature(twin)
    inferred = "\n".join(
        f"    {name}: inferred from {rule.origin(forward)}" for name, rule in TWINS[cls].items()
    )
    return (
        (
            f"Deferred ``torch.nn.{cls.__name__}``: its sizes are inferred from the first "
            f"input, then it becomes a ``torch.nn.{cls.__name__}`` (``type(layer) is "
            f"torch.nn.{cls.__name__}``).\n\n"
            f"Inferred at the first forward (give one by keyword to fix it and build at "
            f"once):\n\n{inferred}\n\n"
            f"Every other argument is torch's, with torch's names and defaults: "
            f"``{cls.__name__}{public_signature(twin)}``.\n"
        )
        + _options(TWINS[cls].values())
        + _example(cls.__name__, twin)
    )


# What each rule option does, for the twins' docstrings (every option of a rule
# above has a line here: a missing one fails at import).
_OPTION_DOCS = {
    "ndim": "how many trailing sizes of the input form ``normalized_shape``",
    "per_channel": "``True`` for one parameter per channel (``input.shape[1]``), else one",
}


def _options(rules: Iterable[Rule]) -> str:
    """The docstring's lines for the rules' options: deferinit's keywords, taken
    besides torch's arguments and therefore not in the signature."""
    lines = [
        f"    ``{name}={default!r}``: {_OPTION_DOCS[name]}"
        for rule in rules
        for name, default in rule.options.items()
    ]
    if not lines:
        return ""
    return (
        "\nOptions (deferinit's, by keyword only; not torch's, so not in the signature):\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _read_as_built(self: Deferred, name: str) -> Any:
    """``Deferred.__getattr__``, then the plain attributes the built layer will have
    (``norm_first``, read by torch's ``TransformerEncoder`` before any layer runs):
    only a read that would otherwise fail pays for it."""
    try:
        return Deferred.__getattr__(self, name)
    except NotBuiltError:
        raise
    except AttributeError:
        found = layer_attribute(self, "", name)
        if found is NOT_PLAIN:
            raise
        return found


def _twin(cls: type[_nn.Module]) -> Any:
    twin = make_deferred(cls, TWINS[cls], _SIGNATURES.get(cls))
    twin.__module__ = __name__
    twin.__getattr__ = _read_as_built  # type: ignore[method-assign, assignment]
    twin.__doc__ = _docstring(cls, twin)
    return twin


Linear: type[Deferred] = _twin(_nn.Linear)
Bilinear: type[Deferred] = _twin(_nn.Bilinear)
Conv1d: type[Deferred] = _twin(_nn.Conv1d)
Conv2d: type[Deferred] = _twin(_nn.Conv2d)
Conv3d: type[Deferred] = _twin(_nn.Conv3d)
ConvTranspose1d: type[Deferred] = _twin(_nn.ConvTranspose1d)
ConvTranspose2d: type[Deferred] = _twin(_nn.ConvTranspose2d)
ConvTranspose3d: type[Deferred] = _twin(_nn.ConvTranspose3d)
BatchNorm1d: type[Deferred] = _twin(_nn.BatchNorm1d)
BatchNorm2d: type[Deferred] = _twin(_nn.BatchNorm2d)
BatchNorm3d: type[Deferred] = _twin(_nn.BatchNorm3d)
SyncBatchNorm: type[Deferred] = _twin(_nn.SyncBatchNorm)
InstanceNorm1d: type[Deferred] = _twin(_nn.InstanceNorm1d)
InstanceNorm2d: type[Deferred] = _twin(_nn.InstanceNorm2d)
InstanceNorm3d: type[Deferred] = _twin(_nn.InstanceNorm3d)
GroupNorm: type[Deferred] = _twin(_nn.GroupNorm)
LayerNorm: type[Deferred] = _twin(_nn.LayerNorm)
RMSNorm: type[Deferred] = _twin(_nn.RMSNorm)
PReLU: type[Deferred] = _twin(_nn.PReLU)
RNN: type[Deferred] = _twin(_nn.RNN)
LSTM: type[Deferred] = _twin(_nn.LSTM)
GRU: type[Deferred] = _twin(_nn.GRU)
RNNCell: type[Deferred] = _twin(_nn.RNNCell)
LSTMCell: type[Deferred] = _twin(_nn.LSTMCell)
GRUCell: type[Deferred] = _twin(_nn.GRUCell)
MultiheadAttention: type[Deferred] = _twin(_nn.MultiheadAttention)
Transformer: type[Deferred] = _twin(_nn.Transformer)
TransformerEncoderLayer: type[Deferred] = _twin(_nn.TransformerEncoderLayer)
TransformerDecoderLayer: type[Deferred] = _twin(_nn.TransformerDecoderLayer)
AdaptiveLogSoftmaxWithLoss: type[Deferred] = _twin(_nn.AdaptiveLogSoftmaxWithLoss)


# Rank-generic twins: ``Conv``, ``ConvTranspose``, ``BatchNorm``, ``InstanceNorm``.
#
# One more argument is inferred, ``spatial_dims`` (1, 2 or 3), read off a batched
# input's rank (N, C, *spatial). The "real class" of such a twin is a factory
# (below) whose construction returns the torch class of that rank, so the layer
# becomes exactly ``nn.Conv2d`` and everything else (build on meta, materialize,
# reset, build configs) goes through the same generic path as every other twin.


@dataclass(frozen=True)
class SpatialDims(Rule):
    """``spatial_dims`` of a rank-generic twin: which of the 1d, 2d and 3d classes
    of ``family`` a batched input of each rank (``ranks``: pairs of input rank and
    spatial dims) builds. Unbatched input is refused: ``(C, H, W)`` is both a
    batched 1d and an unbatched 2d input (with ``spatial_dims`` given, it is not
    read: see ``_infer_by_rank``)."""

    family: str  # "Conv": the explicit classes are dnn.Conv1d, dnn.Conv2d, dnn.Conv3d
    ranks: tuple[tuple[int, int], ...]
    tensor: str | None = "weight"  # the saved tensor whose rank tells it (None: none does)

    def infer(self, call: Call, options: Mapping[str, Any]) -> int:
        x = tensor_argument(call, 0)
        for rank, spatial in self.ranks:
            if x.dim() == rank:
                return spatial
        raise RuleError(self._expected(), describe(x))

    def _expected(self) -> str:
        ranks = ", ".join(str(rank) for rank, _ in self.ranks[:-1])
        ranks = f"{ranks} or {self.ranks[-1][0]}"
        explicit = f"dnn.{self.family}1d, dnn.{self.family}2d or dnn.{self.family}3d"
        return (
            f"a batched input (N, C, *spatial) of {ranks} dimensions (an unbatched input "
            f"is ambiguous: for it use {explicit} explicitly)"
        )

    def provisional(self, size: int, options: Mapping[str, Any]) -> int:
        return 2

    def from_shapes(self, shapes: Mapping[str, tuple[int, ...]], options: Mapping[str, Any]) -> int:
        """The value read off a checkpoint's tensor shapes (by name within the layer):
        a convolution's weight is (out, in / groups, *kernel); the norms' tensors are
        the same for every rank, so a checkpoint cannot tell."""
        one, two, three = (f"{self.family}{n}d" for n in (1, 2, 3))
        if self.tensor is None:
            raise RuleError(
                f"an input, or spatial_dims=... given explicitly ({one}, {two} and {three} "
                f"hold tensors of the same shapes)",
                "only saved tensors",
            )
        shape = shapes.get(self.tensor)
        if shape is None or not 3 <= len(shape) <= 5:
            shown = "none" if shape is None else f"one of shape {shape}"
            raise RuleError(f"a saved {self.tensor} of 3, 4 or 5 dimensions", shown)
        return len(shape) - 2

    def describe(self) -> str:
        return "the rank of the input"

    def origin(self, forward: inspect.Signature | None) -> str:
        name = argument_name(0, forward) or "input"
        shown = ", ".join(f"{rank}-d: {self.family}{n}d" for rank, n in self.ranks)
        return f"``{name}.dim()`` ({shown})"


class _ByRank(_nn.Module):
    """The real class of a rank-generic twin: constructing it with ``spatial_dims``
    constructs the torch class of that rank instead (never an instance of this)."""

    classes: tuple[type[_nn.Module], ...]  # the 1d, 2d and 3d torch classes

    def __new__(cls, *args: Any, spatial_dims: int, **kwargs: Any) -> Any:
        if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
            names = ", ".join(c.__name__ for c in cls.classes)
            raise ArgumentsError(
                f"spatial_dims must be 1, 2 or 3 (for {names}), got {spatial_dims!r}. Fix: "
                f"pass 1, 2 or 3, or leave it out to pick it from the input's rank."
            )
        return cls.classes[spatial_dims - 1](*args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        """Never runs: it names the forward argument the rules read (``input``)."""
        raise NotImplementedError


# Module-level names, so that pickle finds them (a placeholder pickles its class
# as "make it again from this real class and these rules").
class _AnyConv(_ByRank):
    classes = (_nn.Conv1d, _nn.Conv2d, _nn.Conv3d)


class _AnyConvTranspose(_ByRank):
    classes = (_nn.ConvTranspose1d, _nn.ConvTranspose2d, _nn.ConvTranspose3d)


class _AnyBatchNorm(_ByRank):
    classes = (_nn.BatchNorm1d, _nn.BatchNorm2d, _nn.BatchNorm3d)


class _AnyInstanceNorm(_ByRank):
    classes = (_nn.InstanceNorm1d, _nn.InstanceNorm2d, _nn.InstanceNorm3d)


_CONV_RANKS = ((3, 1), (4, 2), (5, 3))

# factory -> rules, as TWINS (spatial_dims first: a wrong rank is reported as such).
RANK_GENERIC: dict[type[_ByRank], dict[str, Rule]] = {
    _AnyConv: {
        "spatial_dims": SpatialDims("Conv", _CONV_RANKS),
        "in_channels": dim(1, ndim=(3, 4, 5)),
    },
    _AnyConvTranspose: {
        "spatial_dims": SpatialDims("ConvTranspose", _CONV_RANKS),
        "in_channels": dim(1, ndim=(3, 4, 5)),
    },
    # BatchNorm1d takes (N, C) and (N, C, L); no BatchNorm takes unbatched input.
    _AnyBatchNorm: {
        "spatial_dims": SpatialDims("BatchNorm", ((2, 1), *_CONV_RANKS), tensor=None),
        "num_features": dim(1, ndim=(2, 3, 4, 5)),
    },
    _AnyInstanceNorm: {
        "spatial_dims": SpatialDims("InstanceNorm", _CONV_RANKS, tensor=None),
        "num_features": dim(1, ndim=(3, 4, 5)),
    },
}


def _rank_signature(classes: tuple[type[_nn.Module], ...]) -> inspect.Signature:
    """The arguments the three classes share (annotations only where they agree),
    then ``spatial_dims`` by keyword."""
    signatures = [inspect.signature(c.__init__) for c in classes]
    shapes = {tuple((p.name, p.kind, p.default) for p in s.parameters.values()) for s in signatures}
    if len(shapes) != 1:
        raise TypeError(f"{', '.join(c.__name__ for c in classes)} take different arguments")
    params = []
    for p in list(signatures[1].parameters.values())[1:]:
        same = all(s.parameters[p.name].annotation == p.annotation for s in signatures)
        params.append(p if same else p.replace(annotation=inspect.Parameter.empty))
    params.append(inspect.Parameter("spatial_dims", inspect.Parameter.KEYWORD_ONLY, annotation=int))
    returned = {s.return_annotation for s in signatures}
    return inspect.Signature(
        params, return_annotation=returned.pop() if len(returned) == 1 else inspect.Signature.empty
    )


def _infer_by_rank(
    self: Deferred, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``Deferred.infer``, except that with ``spatial_dims`` given, an input that the
    twin of that rank takes is read as that twin reads it: an unbatched ``(C,
    *spatial)`` has its channel on axis 0, where the size rule of ``RANK_GENERIC``,
    which must tell the rank from a batched input, reads axis 1. Any other input
    goes the generic way, whose build then names the rank in its error."""
    state, cls = self._di, type(self)
    spatial = state.explicit.get("spatial_dims")
    name = next(n for n in cls._di_rules if n != "spatial_dims")
    if spatial is None or name in state.explicit:
        return Deferred.infer(self, args, kwargs)
    factory: type[_ByRank] = cls._di_cls  # type: ignore[assignment]
    rule = TWINS[factory.classes[spatial - 1]][name]
    assert isinstance(rule, dim)  # the fixed-rank twins' sizes are all dims
    ranks = (rule.ndim,) if isinstance(rule.ndim, int) else rule.ndim
    call = Call(args, kwargs, functools.partial(forward_signature, cls))
    try:
        rank = tensor_argument(call, 0).dim()
    except RuleError:
        return Deferred.infer(self, args, kwargs)  # it words the error
    if ranks is None or rank not in ranks:
        return Deferred.infer(self, args, kwargs)
    try:
        size = rule.infer(call, state.options)
    except RuleError as error:  # worded as Deferred.infer words it
        origin = rule.origin(call.signature).replace("``", "")
        raise InferenceError(
            f"{label(self)} cannot infer {name} (from {origin}): expected "
            f"{error.expected}, got {error.got}. Fix: pass such an input, or give "
            f"{name}=... explicitly to build without inference."
        ) from None
    return {**state.explicit, name: size}


def _unranked_repr(self: Deferred) -> str:
    # The arguments as given: the layout's repr would show the provisional rank's
    # torch repr (``kernel_size=(3, 3)`` for a layer that may become a Conv1d).
    return f"{self._get_name()}({', '.join(constructor_args_of(type(self), self._di))})"


def _rank_generic_twin(factory: type[_ByRank], name: str) -> Any:
    factory.__name__ = name  # the layer's name in reprs, summaries and errors
    rules = RANK_GENERIC[factory]
    twin = make_deferred(factory, rules, _rank_signature(factory.classes))
    twin.__module__, twin.__qualname__ = __name__, name
    twin.__repr__ = _unranked_repr  # type: ignore[method-assign, assignment]
    twin.infer = _infer_by_rank  # type: ignore[method-assign, assignment]
    one, two, three = (c.__name__ for c in factory.classes)
    forward = forward_signature(twin)
    inferred = "\n".join(f"    {n}: inferred from {r.origin(forward)}" for n, r in rules.items())
    twin.__doc__ = (
        f"Deferred ``torch.nn.{one}``, ``{two}`` or ``{three}``, chosen by the rank of "
        f"the first (batched) input; it then becomes exactly that class (``type(layer) is "
        f"torch.nn.{two}``). An unbatched input is ambiguous and refused: use "
        f"``dnn.{one}``, ``dnn.{two}`` or ``dnn.{three}`` for it, or give "
        f"``spatial_dims`` (the size is then read as the twin of that rank reads it).\n\n"
        f"Inferred at the first forward (give one by keyword to fix it; both to build at "
        f"once):\n\n{inferred}\n\n"
        f"Every other argument is torch's, with torch's names and defaults: "
        f"``{name}{public_signature(twin)}``.\n"
    ) + _example(name, twin)
    return twin


Conv: type[Deferred] = _rank_generic_twin(_AnyConv, "Conv")
ConvTranspose: type[Deferred] = _rank_generic_twin(_AnyConvTranspose, "ConvTranspose")
BatchNorm: type[Deferred] = _rank_generic_twin(_AnyBatchNorm, "BatchNorm")
InstanceNorm: type[Deferred] = _rank_generic_twin(_AnyInstanceNorm, "InstanceNorm")
