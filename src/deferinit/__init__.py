"""deferinit: complete deferred initialization (延后初始化) for PyTorch.

Write a network without input sizes; every layer's size is inferred when data
first passes through, and parameters are created and initialized exactly as
eager PyTorch would have.

>>> import torch
>>> from torch import nn
>>> import deferinit as di
>>> from deferinit import nn as dnn
>>> net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
>>> di.is_built(net)
False
>>> net(torch.randn(2, 20)).shape
torch.Size([2, 10])
>>> net[0]
Linear(in_features=20, out_features=256, bias=True)
"""

import torch as _torch
from torch.nn import parameter as _parameter

from . import nn
from ._become._initialize import initialize
from ._become._reset import is_built, pending, reset
from ._checkpoint._load import load_state_dict
from ._declare._deferred import Deferred, defer
from ._declare._placeholder import PlaceholderBuffer as _PlaceholderBuffer
from ._declare._placeholder import PlaceholderParameter as _PlaceholderParameter
from ._declare._rules import Rule, dim
from ._errors import (
    ArgumentsError,
    DeferredInitError,
    InferenceError,
    NotBuiltError,
    ShapeMismatchError,
    UnrecordedInitWarning,
)
from ._fill._materialize import materialize
from ._lazy import adopt
from ._present._summary import summary
from ._record import deferred_init
from ._shape._build import build
from ._shape._config import build_config

__version__ = "0.1.0"

# An unbuilt model's state dict holds placeholders; let weights_only loading accept them.
_torch.serialization.add_safe_globals(
    [
        _parameter.UninitializedParameter,
        _parameter.UninitializedBuffer,
        _PlaceholderParameter,
        _PlaceholderBuffer,
    ]
)

__all__ = [
    "ArgumentsError",
    "Deferred",
    "DeferredInitError",
    "InferenceError",
    "NotBuiltError",
    "Rule",
    "ShapeMismatchError",
    "UnrecordedInitWarning",
    "__version__",
    "adopt",
    "build",
    "build_config",
    "defer",
    "deferred_init",
    "dim",
    "initialize",
    "is_built",
    "load_state_dict",
    "materialize",
    "nn",
    "pending",
    "reset",
    "summary",
]
