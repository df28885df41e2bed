"""torch's own Lazy modules still waiting for their first forward are deferred
layers too (DESIGN §2: ``di.is_built`` / ``di.pending`` say whether anything below
is still deferred): both count them, agree with each other, and agree with
``di.adopt``, which turns them into twins that stay pending until built."""

from __future__ import annotations

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def test_a_waiting_lazy_linear_is_pending() -> None:
    net = nn.Sequential(nn.LazyLinear(3))
    assert not di.is_built(net)
    assert di.pending(net) == ["0"]


def test_lazy_modules_are_listed_in_registration_order_with_twins() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), dnn.Linear(2), nn.LazyBatchNorm1d())
    assert di.pending(net) == ["0", "2", "3"]
    assert di.pending(net[0]) == [""] and not di.is_built(net[0])


def test_a_lazy_module_after_its_first_forward_is_built() -> None:
    net = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    net(torch.rand(2, 5))
    assert di.is_built(net) and di.pending(net) == []


def test_a_lazy_instance_norm_holding_no_tensor_is_pending_until_its_forward() -> None:
    net = nn.Sequential(nn.LazyInstanceNorm1d())  # no affine, no running stats
    assert di.pending(net) == ["0"] and not di.is_built(net)
    net(torch.rand(2, 3, 5))
    assert di.pending(net) == [] and di.is_built(net)


def test_adopted_lazy_modules_stay_pending_until_built() -> None:
    net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(2))
    before = di.pending(net)
    di.adopt(net)
    assert di.pending(net) == before == ["0", "2"] and not di.is_built(net)
    di.build(net, (4, 3))
    assert di.pending(net) == [] and di.is_built(net)


def test_a_lazy_module_given_values_by_a_checkpoint_is_not_pending() -> None:
    net = nn.Sequential(nn.LazyLinear(3))
    net.load_state_dict(nn.Sequential(nn.Linear(5, 3)).state_dict())
    assert di.pending(net) == [] and di.is_built(net)
