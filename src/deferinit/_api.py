"""Inspecting and resetting deferred state: ``is_built``, ``pending``, ``reset``."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from ._become import unbecome
from ._deferred import BUILD_LOCK, Deferred, _Slot

__all__ = ["is_built", "pending", "reset"]

M = TypeVar("M", bound=nn.Module)


def _check(module: object, fn: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"di.{fn} expects an nn.Module, got {type(module).__name__}")


def pending(module: nn.Module) -> list[str]:
    """Qualified names of the layers below ``module`` that are still deferred,
    in registration order (``""`` for ``module`` itself).

    >>> import torch, deferinit as di
    >>> from torch import nn
    >>> from deferinit import nn as dnn
    >>> net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    >>> di.pending(net)
    ['0', '2']
    >>> _ = net(torch.randn(1, 3)); di.pending(net)
    []
    """
    _check(module, "pending")
    return [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, Deferred) and not _inside_placeholder(module, name)
    ]


def _inside_placeholder(root: nn.Module, name: str) -> bool:
    parts = name.split(".") if name else []
    sub = root
    for part in parts[:-1]:
        sub = sub._modules[part]  # type: ignore[assignment]
        if isinstance(sub, Deferred | _Slot):
            return True
    return False


def is_built(module: nn.Module) -> bool:
    """Whether no layer below ``module`` (or ``module`` itself) is still deferred."""
    _check(module, "is_built")
    return not any(isinstance(sub, Deferred) for sub in module.modules())


def reset(module: M) -> M:
    """Turn every layer below ``module`` that deferinit built back into a deferred
    layer: sizes are forgotten, so the next input infers them again. Initializers,
    hooks, train/eval mode, dtype, device and the parameter objects themselves are
    kept (emptied in place); layers whose sizes were all given explicitly are left
    as they are. Returns ``module``.

    >>> import torch, deferinit as di
    >>> from deferinit import nn as dnn
    >>> layer = dnn.Linear(4)
    >>> _ = layer(torch.randn(1, 3))
    >>> _ = di.reset(layer)
    >>> layer(torch.randn(1, 5)).shape, layer.in_features
    (torch.Size([1, 4]), 5)
    """
    _check(module, "reset")
    with BUILD_LOCK:
        # Innermost first, so a reset block does not keep stale built children.
        for sub in reversed(list(module.modules())):
            unbecome(sub)
    return module
