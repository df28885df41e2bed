"""Init code run on a model's meta tensors after they were made, and before
``di.materialize``, changes nothing there (a meta tensor has no values) and cannot be
replayed: ``di.materialize`` refuses it, naming the tensors and the fix, before
anything is allocated, instead of silently giving values without it. Nothing is
silently lost (docs/design.md §3).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def zero_linears(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.zeros_(module.weight)


def test_init_on_a_recorded_models_meta_tensor_is_refused_by_name() -> None:
    model = di.deferred_init(nn.Linear, 4, 3)
    nn.init.zeros_(model.weight)
    with pytest.raises(di.DeferredInitError) as caught:
        di.materialize(model)
    message = str(caught.value)
    assert "'weight'" in message and "di.deferred_init" in message
    assert "after di.materialize" in message and "di.initialize" in message
    assert model.weight.is_meta and model.bias.is_meta  # nothing allocated


def test_apply_after_a_meta_build_is_refused_and_the_model_stays_on_meta() -> None:
    net = di.build(nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2)), (1, 4), device="meta")
    net.apply(zero_linears)
    with pytest.raises(di.DeferredInitError) as caught:
        di.materialize(net)
    message = str(caught.value)
    assert "'0.weight'" in message and "'2.weight'" in message
    assert all(t.is_meta for t in net.state_dict().values())


def test_the_fix_it_names_gives_the_init() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    di.build(net, (1, 4), device="meta")
    di.initialize(net, zero_linears)
    di.materialize(net)
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(weights) == 2 and not any(bool(w.any()) for w in weights)


def test_in_place_changes_on_the_real_tensors_after_materialize_are_the_users() -> None:
    model = di.materialize(di.deferred_init(nn.Linear, 4, 3))
    nn.init.zeros_(model.weight)
    assert not model.weight.any()


@pytest.mark.parametrize("copied", ["deepcopy", "pickle"])
def test_copies_of_an_untouched_recorded_model_materialize_as_eager(copied: str) -> None:
    torch.manual_seed(0)
    model = di.deferred_init(nn.Linear, 4, 3)
    copy_ = copy.deepcopy(model) if copied == "deepcopy" else pickle.loads(pickle.dumps(model))
    di.materialize(copy_)
    torch.manual_seed(0)
    eager = nn.Linear(4, 3)
    assert torch.equal(copy_.weight, eager.weight) and torch.equal(copy_.bias, eager.bias)


def test_a_conversion_before_materialize_is_no_change_of_values() -> None:
    torch.manual_seed(0)
    model = di.deferred_init(nn.Linear, 4, 3).to(torch.float64)
    di.materialize(model)
    torch.manual_seed(0)
    eager = nn.Linear(4, 3).to(torch.float64)
    assert torch.equal(model.weight, eager.weight)


def test_a_meta_build_and_its_registered_initializer_are_no_change_of_values() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, {"*weight": nn.init.ones_})
    di.build(net, (1, 4), device="meta")
    di.materialize(net)
    first = net[0]
    assert isinstance(first, nn.Linear) and bool(torch.all(first.weight == 1))


@pytest.mark.parametrize("how", ["recorded", "twins built on meta"])
def test_a_training_forward_on_meta_updating_running_statistics_is_no_init(how: str) -> None:
    if how == "recorded":
        model = di.deferred_init(lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    else:
        model = di.build(nn.Sequential(dnn.Linear(3), dnn.BatchNorm1d()), (2, 4), device="meta")
    model.train()
    model(torch.empty(2, 4, device="meta"))  # a shape check: bumps the running statistics
    di.materialize(model)
    assert model.get_buffer("1.num_batches_tracked").item() == 0
