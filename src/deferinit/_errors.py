"""The deferinit error family.

Every message names the layer (qualified name and class), says what happened,
what was expected, and how to fix it.
"""

from __future__ import annotations

import torch

__all__ = [
    "ArgumentsError",
    "DeferredInitError",
    "InferenceError",
    "NotBuiltError",
    "ShapeMismatchError",
    "UnrecordedInitWarning",
    "device_argument",
]


class DeferredInitError(RuntimeError):
    """Base class of every error deferinit raises.

    It derives from ``RuntimeError`` because that is what torch raises for shape
    problems, so code that already catches torch's errors keeps working.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> try:
    ...     dnn.Linear(4)(torch.tensor(1.0))  # a 0-d input has no last dimension
    ... except di.DeferredInitError as error:
    ...     print(type(error).__name__, isinstance(error, RuntimeError))
    InferenceError True
    """


class ShapeMismatchError(DeferredInitError, ValueError):
    """A built layer received an input whose inferred dimension changed.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4)
    >>> _ = layer(torch.randn(2, 3))
    >>> try:
    ...     layer(torch.randn(2, 5))
    ... except di.ShapeMismatchError as error:
    ...     print("in_features=3" in str(error))
    True
    """


class InferenceError(DeferredInitError, ValueError):
    """A deferred layer cannot infer its sizes from the input it was given.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4)
    >>> try:
    ...     layer(torch.tensor(1.0))
    ... except di.InferenceError as error:
    ...     print(str(error).split(":")[0])
    Linear layer cannot infer in_features (from input.shape[-1])
    >>> di.is_built(layer)  # nothing was built
    False
    """


class NotBuiltError(DeferredInitError):
    """An operation needs sizes that are not known yet.

    >>> import deferinit as di
    >>> from deferinit import nn as dnn
    >>> try:
    ...     dnn.Linear(4).weight.sum()
    ... except di.NotBuiltError:
    ...     print("sizes unknown until the first forward or di.build")
    sizes unknown until the first forward or di.build
    """


class ArgumentsError(DeferredInitError, TypeError, ValueError):
    """Arguments rejected whatever sizes are inferred: a deferred layer's that its
    torch class rejects (``dnn.MultiheadAttention(num_heads=0)``), or a deferinit
    function's (``di.materialize(model, device="meta")``, ``di.build(42, x)``). Also
    a ``TypeError`` and a ``ValueError``, which Python code checks for a wrong
    argument.

    >>> import deferinit as di
    >>> from deferinit import nn as dnn
    >>> try:
    ...     dnn.LSTM(hidden_size=4, proj_size=4)
    ... except di.DeferredInitError as error:
    ...     print(isinstance(error, TypeError), "rejects these arguments" in str(error))
    True True
    """


class UnrecordedInitWarning(UserWarning):
    """``di.materialize`` filled modules declared under ``torch.device("meta")``
    without :func:`deferinit.deferred_init`: nothing recorded their construction,
    so only each layer's own ``reset_parameters`` runs, and initialization the
    model's ``__init__`` did after constructing them (an init loop, a value
    computed there) is not replayed. Their values may differ from eager
    construction; the message names them and the fix.

    >>> import warnings, torch, deferinit as di
    >>> from torch import nn
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(nn.Linear(2, 3))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = di.materialize(model)
    >>> [w.category.__name__ for w in caught]
    ['UnrecordedInitWarning']
    """


def device_argument(function: str, device: object, done: str) -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` stays ``None``), or the
    :class:`ArgumentsError` of ``function`` (by whose name it speaks; ``done`` is
    what nothing was: "allocated", "built")."""
    if device is None:
        return None
    try:
        target: torch.device = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError) as error:
        raise ArgumentsError(
            f"{function}: device={device!r} is not a device torch knows ({error}). Nothing "
            f"was {done}. Fix: pass e.g. device='cpu', 'cuda', 'cuda:1' or 'meta'."
        ) from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentsError(
            f"{function}: device={device!r}, but this torch has no CUDA device to use "
            f"(torch.cuda.is_available() is False). Nothing was {done}. Fix: pass "
            f"device='cpu' (or 'meta'), or install a CUDA build of torch on a machine with "
            f"a GPU."
        )
    return target
