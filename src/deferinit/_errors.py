"""The deferinit error family.

Every message names the layer (qualified name and class), says what happened,
what was expected, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DeferredInitError",
    "InferenceError",
    "NotBuiltError",
    "ShapeMismatchError",
    "UnrecordedInitWarning",
]


class DeferredInitError(RuntimeError):
    """Base class of every error deferinit raises.

    It derives from ``RuntimeError`` because that is what torch raises for shape
    problems, so code that already catches torch's errors keeps working.
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
    """A deferred layer cannot infer its sizes from the input it was given."""


class NotBuiltError(DeferredInitError):
    """An operation needs sizes that are not known yet."""


class UnrecordedInitWarning(UserWarning):
    """``di.materialize`` filled modules declared under ``torch.device("meta")``
    without :func:`deferinit.deferred_init`: nothing recorded their construction,
    so only each layer's own ``reset_parameters`` runs, and initialization the
    model's ``__init__`` did after constructing them (an init loop, a value
    computed there) is not replayed. Their values may differ from eager
    construction; the message names them and the fix.
    """
