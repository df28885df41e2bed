"""The inference rules that torch.nn layers need beyond ``di.dim``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._declare._rules import (
    MISSING,
    Call,
    Rule,
    RuleError,
    _argument_name,
    _tensor,
    describe,
    size_at,
)

__all__ = ["PerChannel", "SizeIfDiffers", "Trailing"]


class Trailing(Rule):
    """``normalized_shape`` of LayerNorm/RMSNorm: the last ``ndim`` sizes (option, default 1)."""

    options: Mapping[str, Any] = {"ndim": 1}

    def infer(self, call: Call, options: Mapping[str, Any]) -> tuple[int, ...]:
        k = _ndim(options)
        x = _tensor(call, 0)
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
        name = _argument_name(0, forward) or "input"
        return f"``{name}.shape[-ndim:]`` (``ndim``: keyword, default 1)"

    def __hash__(self) -> int:
        return hash(type(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _ndim(options: Mapping[str, Any]) -> int:
    k = options["ndim"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TypeError(f"ndim must be a positive int (how many trailing dimensions), got {k!r}")
    return k


class PerChannel(Rule):
    """PReLU's ``num_parameters``: 1, or with ``per_channel=True`` the channel size
    (axis 1; 1 for inputs of fewer than 2 dimensions, as torch defines it)."""

    options: Mapping[str, Any] = {"per_channel": False}

    def static(self, options: Mapping[str, Any], explicit: Mapping[str, Any]) -> Any:
        return MISSING if options["per_channel"] else 1

    def infer(self, call: Call, options: Mapping[str, Any]) -> int:
        x = _tensor(call, 0)
        if not options["per_channel"] or x.dim() < 2:
            return 1
        size = size_at(x, 1)
        if size == 0:
            raise RuleError("a non-zero channel size on axis 1", describe(x))
        return size

    def describe(self) -> str:
        return "the channel size (axis 1)"

    def origin(self, forward: inspect.Signature | None) -> str:
        name = _argument_name(0, forward) or "input"
        return f"``{name}.shape[1]`` with ``per_channel=True`` (keyword), else 1"

    def __hash__(self) -> int:
        return hash(type(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        x = _tensor(call, arg)
        if x.dim() == 0:
            raise RuleError(f"{arg} with at least 1 dimension", describe(x))
        return size_at(x, -1)

    def provisional(self, size: int, options: Mapping[str, Any]) -> None:
        return None

    def describe(self) -> str:
        return f"the last size of {self.arg}, when it differs from {self.ref}'s"

    def origin(self, forward: inspect.Signature | None) -> str:
        return f"``{self.arg}.shape[-1]`` when it differs from ``{self.ref}.shape[-1]``, else None"
