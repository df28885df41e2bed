"""``adopt``: turn ``torch.nn.Lazy*`` modules into deferinit twins in place.

(Being written; see issue 12.)
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["adopt"]

M = TypeVar("M", bound=nn.Module)


def adopt(module: M) -> M:
    """Turn every ``torch.nn.Lazy*`` module below ``module`` into its deferinit twin."""
    raise NotImplementedError("di.adopt is being written (issue 12)")
