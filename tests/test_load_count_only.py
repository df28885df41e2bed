"""A checkpoint holding only a deferred norm's ``num_batches_tracked`` leaves the
norm deferred with its other keys missing (as torch's Lazy norm), but never drops
the count: the build keeps it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _count(model: nn.Module) -> int:
    count = model.get_buffer("num_batches_tracked")
    assert count.dtype == torch.long and count.shape == ()
    return int(count)


@pytest.mark.parametrize("route", ["torch", "di"])
def test_count_alone_is_kept_for_the_build(route: str) -> None:
    sd = {"num_batches_tracked": torch.tensor(7)}
    bn = dnn.BatchNorm1d()
    loaded = (
        bn.load_state_dict(sd, strict=False)
        if route == "torch"
        else di.load_state_dict(bn, sd, strict=False)
    )
    assert sorted(loaded.missing_keys) == ["bias", "running_mean", "running_var", "weight"]
    assert di.pending(bn) == [""]
    assert sd["num_batches_tracked"].data_ptr() != bn.get_buffer("num_batches_tracked").data_ptr()
    bn.eval()(torch.randn(3, 6))
    assert _count(bn) == 7
    bn.train()(torch.randn(3, 6))
    assert _count(bn) == 8


def test_count_alone_then_build_by_di_build() -> None:
    bn = nn.Sequential(dnn.BatchNorm1d())
    di.load_state_dict(bn, {"0.num_batches_tracked": torch.tensor([5])}, strict=False)
    di.build(bn, (3, 6))
    assert _count(bn[0]) == 5


def test_count_alone_under_strict_is_an_error_and_nothing_loaded() -> None:
    bn = dnn.BatchNorm1d()
    with pytest.raises(di.DeferredInitError, match="missing keys: weight"):
        di.load_state_dict(bn, {"num_batches_tracked": torch.tensor(7)})
    bn.eval()(torch.randn(3, 6))
    assert _count(bn) == 0


def test_lazy_norm_saved_before_its_forward_still_leaves_the_twin_deferred() -> None:
    saved = nn.LazyBatchNorm1d().state_dict()
    bn = dnn.BatchNorm1d()
    di.load_state_dict(bn, saved)
    assert di.pending(bn)


def test_count_with_the_sizes_loads() -> None:
    torch.manual_seed(0)
    eager = nn.BatchNorm1d(6)
    assert eager.num_batches_tracked is not None
    eager.num_batches_tracked.fill_(7)
    bn = dnn.BatchNorm1d()
    di.load_state_dict(bn, eager.state_dict())
    assert _count(bn) == 7


def test_unbuilt_twin_with_a_count_round_trips() -> None:
    bn = dnn.BatchNorm1d()
    di.load_state_dict(bn, {"num_batches_tracked": torch.tensor(7)}, strict=False)
    again = dnn.BatchNorm1d()
    di.load_state_dict(again, bn.state_dict())
    assert di.pending(again) == [""]
    again.eval()(torch.randn(3, 6))
    assert _count(again) == 7
