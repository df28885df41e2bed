"""Deferred twins of every ``torch.nn`` layer whose constructor takes a size that
the input determines.

Each twin takes torch's arguments, with torch's names and defaults, minus the
inferred ones; positional arguments skip the inferred ones (``Linear(256)`` means
``out_features=256``). Passing an inferred argument by keyword builds at once.
After the first forward the object *is* the torch layer (``type(m) is
torch.nn.Linear``).

``TWINS`` is the table the twins are made from; the tests read it too.

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

import inspect
from typing import Any

from torch import nn as _nn

from ._declare._deferred import Deferred, make_deferred
from ._declare._rules import Rule, dim
from ._declare._signature import ClassSignature, forward_signature, public_signature
from ._nn_rules import PerChannel, SizeIfDiffers, Trailing

__all__ = [
    "TWINS",
    "AdaptiveLogSoftmaxWithLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "GRU",
    "GRUCell",
    "GroupNorm",
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
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]


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


def _docstring(cls: type[_nn.Module], twin: type[Deferred]) -> str:
    forward = forward_signature(twin)
    inferred = "\n".join(
        f"    {name}: inferred from {rule.origin(forward)}" for name, rule in TWINS[cls].items()
    )
    return (
        f"Deferred ``torch.nn.{cls.__name__}``: its sizes are inferred from the first "
        f"input, then it becomes a ``torch.nn.{cls.__name__}`` (``type(layer) is "
        f"torch.nn.{cls.__name__}``).\n\n"
        f"Inferred at the first forward (give one by keyword to fix it and build at "
        f"once):\n\n{inferred}\n\n"
        f"Every other argument is torch's, with torch's names and defaults: "
        f"``{cls.__name__}{public_signature(twin)}``.\n"
    )


def _twin(cls: type[_nn.Module]) -> Any:
    twin = make_deferred(cls, TWINS[cls], _SIGNATURES.get(cls))
    twin.__module__ = __name__
    twin.__doc__ = _docstring(cls, twin)
    twin.__signature__ = ClassSignature(public_signature(twin))  # type: ignore[attr-defined]
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
TransformerEncoderLayer: type[Deferred] = _twin(_nn.TransformerEncoderLayer)
TransformerDecoderLayer: type[Deferred] = _twin(_nn.TransformerDecoderLayer)
AdaptiveLogSoftmaxWithLoss: type[Deferred] = _twin(_nn.AdaptiveLogSoftmaxWithLoss)
