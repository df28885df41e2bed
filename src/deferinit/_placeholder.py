"""The placeholder tensors a deferred layer owns before its sizes are known.

They are torch's ``UninitializedParameter``/``UninitializedBuffer`` (so torch's
own checks, such as DDP's, recognise them) that also accept ``requires_grad_``:
``model.requires_grad_(False)`` before the first forward must carry over to the
built layer (torch's classes refuse every in-place call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

__all__ = ["PlaceholderBuffer", "PlaceholderParameter"]


class PlaceholderParameter(UninitializedParameter):
    """An ``UninitializedParameter`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedParameter._allowed_methods,  # type: ignore[attr-defined]
        torch.Tensor.requires_grad_,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedParameter>"


class PlaceholderBuffer(UninitializedBuffer):
    """An ``UninitializedBuffer`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedBuffer._allowed_methods,  # type: ignore[attr-defined]
        torch.Tensor.requires_grad_,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedBuffer>"
