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


class _Portable:
    """Copies and pickles that keep dtype and device (torch's keep only requires_grad)."""

    requires_grad: bool
    device: torch.device
    dtype: torch.dtype

    def __reduce_ex__(self, proto: Any) -> Any:
        return (type(self), (self.requires_grad, self.device, self.dtype))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:
            memo[id(self)] = type(self)(self.requires_grad, self.device, self.dtype)  # type: ignore[call-arg]
        return memo[id(self)]


class PlaceholderParameter(_Portable, UninitializedParameter):
    """An ``UninitializedParameter`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedParameter._allowed_methods,  # type: ignore[attr-defined]
        torch.Tensor.requires_grad_,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedParameter>"


class PlaceholderBuffer(_Portable, UninitializedBuffer):
    """An ``UninitializedBuffer`` that also takes ``requires_grad_``."""

    _allowed_methods = [
        *UninitializedBuffer._allowed_methods,  # type: ignore[attr-defined]
        torch.Tensor.requires_grad_,
    ]

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return "<UninitializedBuffer>"
