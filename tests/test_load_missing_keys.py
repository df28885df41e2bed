"""A checkpoint that lacks some of a layer's tensors: the layer holds what eager
would (its own initialization for what is not loaded, never uninitialized memory),
missing-key lists equal eager's, and BatchNorm's exemption for checkpoints saved
before ``num_batches_tracked`` existed holds on both load paths."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Load = Callable[..., object]


def _di(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> object:
    return di.load_state_dict(model, state, strict=strict)


def _torch(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> object:
    return model.load_state_dict(state, strict=strict)


LOADERS = pytest.mark.parametrize("load", [_di, _torch], ids=["di", "torch"])


@LOADERS
def test_missing_bias_is_initialized_as_eager(load: Load) -> None:
    weight = torch.randn(4, 6)
    torch.manual_seed(3)
    eager = nn.Sequential(nn.Linear(6, 4))
    eager_result = eager.load_state_dict({"0.weight": weight}, strict=False)
    torch.manual_seed(3)
    model = nn.Sequential(dnn.Linear(4))
    result = load(model, {"0.weight": weight}, strict=False)
    assert result == eager_result
    assert torch.equal(model.get_parameter("0.weight").detach(), weight)
    assert torch.equal(
        model.get_parameter("0.bias").detach(), eager.get_parameter("0.bias").detach()
    )
    assert di.pending(model) == []
    model(torch.randn(2, 6)).sum().backward()


@LOADERS
def test_checkpoint_without_count_loads_as_eager(load: Load) -> None:
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()
    old = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    eager_result = eager.load_state_dict(old)
    for _ in range(3):  # uninitialized memory would differ from run to run
        model = nn.Sequential(dnn.Conv2d(4, 3), dnn.BatchNorm2d())
        assert load(model, old) == eager_result
        assert torch.equal(
            model.get_buffer("1.num_batches_tracked"), eager.get_buffer("1.num_batches_tracked")
        )
        for key, value in eager.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


@LOADERS
def test_built_model_keeps_its_count_without_one_saved(load: Load) -> None:
    saved = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).state_dict()
    old = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    model = nn.Sequential(dnn.Linear(4), dnn.BatchNorm1d())
    model(torch.randn(3, 6))
    model(torch.randn(3, 6))
    assert load(model, old) == nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).load_state_dict(
        old
    )
    assert int(model.get_buffer("1.num_batches_tracked")) == 2  # eager keeps its own


def test_meta_built_count_without_one_saved_is_zero() -> None:
    saved = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).state_dict()
    old = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    model = nn.Sequential(dnn.Linear(4), dnn.BatchNorm1d())
    di.build(model, torch.randn(3, 6), device="meta")
    di.load_state_dict(model, old)
    assert torch.equal(model.get_buffer("1.num_batches_tracked"), torch.tensor(0))


@LOADERS
def test_count_is_missing_when_metadata_says_version_2(load: Load) -> None:
    eager = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    saved = eager.state_dict()
    del saved["1.num_batches_tracked"]  # _metadata kept: version 2, so the count is missing
    expected = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).load_state_dict(
        saved, strict=False
    )
    assert expected.missing_keys == ["1.num_batches_tracked"]
    model = nn.Sequential(dnn.Linear(4), dnn.BatchNorm1d())
    assert load(model, saved, strict=False) == expected
    assert torch.equal(model.get_buffer("1.num_batches_tracked"), torch.tensor(0))


@LOADERS
def test_missing_keys_in_eager_order(load: Load) -> None:
    saved = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).state_dict()
    eager = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    expected = eager.load_state_dict(saved, strict=False)
    model = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.BatchNorm1d(), dnn.Linear(2))
    assert load(model, saved, strict=False) == expected


def test_failed_strict_load_leaves_the_generators_where_they_were() -> None:
    # The layer missing a key is constructed for real (eager's construction draws
    # before its load); the strict refusal then undoes that draw too.
    saved = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).state_dict()
    del saved["2.bias"]
    model = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(4))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(di.DeferredInitError, match=r"missing keys: 2\.bias"):
        di.load_state_dict(model, saved)
    assert torch.equal(torch.get_rng_state(), before)
    assert di.pending(model) == ["0", "2"]
    model(torch.ones(2, 3))
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    for ours, theirs in zip(model.parameters(), eager.parameters(), strict=True):
        assert torch.equal(ours.detach(), theirs.detach())
