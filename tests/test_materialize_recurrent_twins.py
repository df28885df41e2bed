"""Recurrent twins built on meta materialize to eager's values and run
(DESIGN §3.3: ``di.build`` on meta, then ``di.materialize``, is exact): an RNN's
``_flat_weights`` list is its parameters again, never taken for plain tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

TWINS = {"LSTM": (dnn.LSTM, nn.LSTM), "GRU": (dnn.GRU, nn.GRU), "RNN": (dnn.RNN, nn.RNN)}


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("kind", list(TWINS))
def test_a_recurrent_twin_built_on_meta_materializes_and_runs_as_eager(
    kind: str, seed: int | None
) -> None:
    twin, torch_cls = TWINS[kind]
    x = torch.rand(2, 3, 4)
    net = nn.Sequential(twin(6, batch_first=True))
    di.build(net, x, device="meta")
    torch.manual_seed(0)
    di.materialize(net, seed=seed)
    out, _ = net[0](x)
    assert out.shape == (2, 3, 6)
    if seed is None:
        torch.manual_seed(0)
        eager = nn.Sequential(torch_cls(4, 6, batch_first=True))
        ours, theirs = net.state_dict(), eager.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert torch.equal(out, eager[0](x)[0])
