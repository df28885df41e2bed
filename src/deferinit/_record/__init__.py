"""Recording a whole construction and replaying it bitwise: ``di.deferred_init``.

Stage between ``_shape`` and ``_fill``: ``di.materialize`` calls
:func:`replay_recorded` first, then fills what was not recorded.

>>> import torch
>>> from torch import nn
>>> from deferinit._record import deferred_init, replay_recorded
>>> model = deferred_init(nn.Linear, 2, 3)
>>> replay_recorded(model).weight.shape
torch.Size([3, 2])
"""

from ._deferred_init import deferred_init, recording
from ._errors import RecordError, ReplayError, ValueReadError
from ._replay import Undo, awaiting_replay, changed_on_meta, records, replay_recorded

__all__ = [
    "RecordError",
    "ReplayError",
    "Undo",
    "ValueReadError",
    "awaiting_replay",
    "changed_on_meta",
    "deferred_init",
    "records",
    "recording",
    "replay_recorded",
]
