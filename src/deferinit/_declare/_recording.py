"""What ``di.deferred_init`` hears from the declare stage while it records.

A deferred layer declared inside a recorded construction cannot be constructed
there (its sizes are unknown), yet eager construction would have constructed it
right there, drawing its random numbers between the draws around it. So the
recorder is told of each declaration, and of each init call queued on a
placeholder (``layer.weight.data.normal_(0, 0.01)``), and writes them into the
record at that place in program order; ``di.materialize`` constructs the layer
and runs the calls there once the sizes are known (docs/design.md §3.3, §3.11).
Outside a recording nothing is set and nothing happens. Per thread, as dispatch
modes are.

>>> HOOKS.declared is None
True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["HOOKS", "RECORD_KEY", "Hooks", "holds_record"]

RECORD_KEY = "_di_record"  # where a record lives in the recorded module's __dict__


def holds_record(module: nn.Module) -> bool:
    """Whether a construction recorded by ``di.deferred_init`` below ``module`` still
    waits for ``di.materialize`` to replay it."""
    return any(RECORD_KEY in sub.__dict__ for sub in module.modules())


class Hooks(threading.local):
    """Set by the recorder for the duration of one ``deferred_init``.

    ``declared(layer)``: a deferred layer was declared (after its placeholders).
    ``queued(placeholder, call)``: an init call was queued on a placeholder.
    ``applied(layer, fn)``: ``layer.apply(fn)`` was called on a deferred layer
    (``self.apply(init)`` at the end of a model's ``__init__``).
    ``outside()``: a context where nothing is recorded (the layout probe and the
    placeholders of a declaration are deferinit's, not the model's).
    """

    declared: Callable[[nn.Module], None] | None = None
    queued: Callable[[torch.Tensor, Any], None] | None = None
    applied: Callable[[nn.Module, Callable[[nn.Module], Any]], None] | None = None
    outside: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


HOOKS = Hooks()
