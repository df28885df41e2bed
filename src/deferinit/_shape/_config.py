"""``build_config``: the inferred arguments of every built layer, as JSON-able data.

(Being written; see issue 12.)
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["build_config"]


def build_config(module: nn.Module) -> dict[str, Any]:
    """Every built layer's inferred arguments by qualified name (JSON-serializable)."""
    raise NotImplementedError("di.build_config is being written (issue 12)")
