"""Sizes from a checkpoint where a saved dimension is not a linear function of the
argument (docs/design.md §3.7): AdaptiveLogSoftmaxWithLoss's tail projections are
``in_features // div_value ** (i + 1)``. One saved dimension gives the size exactly
(``head.weight``); the others are checked against the layer built with it. Errors
name the deferred layer and the key, not an internal holder class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _eager() -> nn.AdaptiveLogSoftmaxWithLoss:
    torch.manual_seed(0)
    return nn.AdaptiveLogSoftmaxWithLoss(16, 20, [5, 10])


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_adaptive_log_softmax_loads_into_unbuilt_twin(loader: str) -> None:
    eager = _eager()
    m = dnn.AdaptiveLogSoftmaxWithLoss(20, [5, 10])
    if loader == "di":
        result = di.load_state_dict(m, eager.state_dict())
        assert result.missing_keys == [] and result.unexpected_keys == []
    else:
        m.load_state_dict(eager.state_dict())
    assert isinstance(m, nn.AdaptiveLogSoftmaxWithLoss) and m.in_features == 16
    assert m.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key
    x, target = torch.randn(3, 16), torch.tensor([1, 7, 15])
    assert torch.equal(m(x, target).output, eager(x, target).output)


def test_adaptive_log_softmax_tail_that_does_not_fit_is_an_error() -> None:
    sd = _eager().state_dict()
    sd["tail.0.0.weight"] = torch.zeros(5, 16)  # 16 // 4 is 4
    m = dnn.AdaptiveLogSoftmaxWithLoss(20, [5, 10])
    with pytest.raises(di.DeferredInitError) as info:
        di.load_state_dict(m, sd)
    text = str(info.value)
    assert "AdaptiveLogSoftmaxWithLoss layer" in text and "tail.0.0.weight" in text
    assert "Holder" not in text
    assert isinstance(m, di.Deferred)


def test_adaptive_log_softmax_tail_that_does_not_fit_torch_path() -> None:
    sd = _eager().state_dict()
    sd["tail.0.0.weight"] = torch.zeros(5, 16)
    m = dnn.AdaptiveLogSoftmaxWithLoss(20, [5, 10])
    with pytest.raises(RuntimeError, match=r"tail\.0\.0\.weight") as info:
        m.load_state_dict(sd)
    assert "Holder" not in str(info.value)
    assert isinstance(m, di.Deferred)
