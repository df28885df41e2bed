"""The bookkeeping a deferinit layer carries in its ``__dict__`` (as ``_di``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._deferred import Deferred
    from ._layout import Layout

__all__ = ["State", "replace"]


@dataclass
class State:
    """What a layer made through deferinit remembers, built or not.

    ``deferred`` is the deferred class (``deferinit.nn.Linear``), so that
    ``di.reset`` can turn the built layer back into a placeholder.
    """

    deferred: type[Deferred]
    arguments: dict[str, Any]  # constructor arguments the user gave, by name
    options: dict[str, Any]  # rule options (e.g. LayerNorm's ndim)
    explicit: dict[str, Any]  # inferable arguments the user (or the options) fixed
    layout: Layout | None = None
    values: dict[str, Any] | None = None  # every rule argument, once built
    built_from: str | None = None  # the input the sizes were read from
    init: Any = None  # registered initializer (see _initialize.py)
    initialized: bool = False  # deferinit ran an initializer on this layer
    own_hooks: dict[str, list[Any]] = field(default_factory=dict)
