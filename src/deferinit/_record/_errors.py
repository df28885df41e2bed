"""Errors of recording and replaying a construction.

Every message names the operation, the module whose code ran it (class and
method, with the source line of the user's code), what was expected and the fix.
"""

from __future__ import annotations

import os
import sys
from types import FrameType

import torch
from torch import nn

from .._errors import DeferredInitError, NotBuiltError

__all__ = ["RecordError", "ReplayError", "ValueReadError", "where"]


class RecordError(DeferredInitError):
    """``deferred_init`` cannot record this construction faithfully.

    >>> issubclass(RecordError, DeferredInitError)
    True
    """


class ValueReadError(RecordError, NotBuiltError):
    """Construction read a tensor's value (``.item()``, ``bool(t)``, ``.tolist()``)
    that depends on random numbers, so it is not known until ``materialize`` runs
    under the user's seed: like a size, it is not known yet.

    >>> issubclass(ValueReadError, NotBuiltError)
    True
    """


class ReplayError(DeferredInitError):
    """Replaying a record failed; the model was left as it was (still on ``meta``)."""


# torch's files and deferinit's own (this file's parent package) are not the user's code.
_OURS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _is_ours(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_OURS)


def where() -> str:
    """The module running the current operation and the user's source line, from the
    Python stack (only computed when an error is raised, never on the normal path).

    >>> where().startswith("in ")
    True
    """
    frame = sys._getframe(1)
    module: str | None = None
    line: str | None = None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if module is None and isinstance(owner, nn.Module):
            module = f"{type(owner).__qualname__}.{frame.f_code.co_name}"
        if line is None and not _is_ours(frame):
            line = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        if module is not None and line is not None:
            break
        frame = frame.f_back  # type: ignore[assignment]
    return f"in {module or '<no module>'} ({line or 'unknown line'})"
