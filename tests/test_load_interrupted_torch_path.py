"""torch's own ``model.load_state_dict`` into a deferred model that fails inside a
layer's loader (its load pre-hook raising, Ctrl-C included) leaves that layer as it
was, deferred with the same placeholders, never built on memory nothing wrote
(DESIGN §3.10); a later forward builds it as usual."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_a_failing_load_hook_leaves_the_layer_deferred(error: type[BaseException]) -> None:
    checkpoint = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2)).state_dict()
    net = nn.Sequential(dnn.Linear(8), dnn.Linear(2))
    placeholder = net[1].weight

    def fail(*_: Any) -> None:
        raise error("while loading")

    net[1].register_load_state_dict_pre_hook(fail)
    with pytest.raises(error):
        net.load_state_dict(checkpoint)
    assert di.pending(net) == ["1"]
    assert net[1].weight is placeholder
    assert isinstance(placeholder, nn.parameter.UninitializedParameter)
    torch.manual_seed(0)
    out = net(torch.randn(4, 3))
    assert out.shape == (4, 2) and di.is_built(net) and net[1].weight is placeholder
