"""A tie made before the build, loaded from a checkpoint that stores it once
(docs/design.md §3.7, §3.10): safetensors' ``save_model`` and Hugging Face drop the
second key of a tie. The placeholder tied to a saved tensor takes its sizes from
that tensor's key; the tie stays one object; only the dropped key is missing, as
eager's non-strict load reports."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class Tied(nn.Module):
    def __init__(self, lin: Callable[[], nn.Module], *, tie_first: bool = False) -> None:
        super().__init__()
        self.a, self.b = lin(), lin()
        if tie_first:
            self.a.weight = self.b.weight
        else:
            self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


def _saved_once(dropped: str, *, tie_first: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    eager = Tied(lambda: nn.Linear(4, 4), tie_first=tie_first)
    return {k: v for k, v in eager.state_dict().items() if k != dropped}


def _eager_result(sd: dict[str, torch.Tensor], *, tie_first: bool = False) -> object:
    return Tied(lambda: nn.Linear(4, 4), tie_first=tie_first).load_state_dict(sd, strict=False)


def _check(m: Tied, sd: dict[str, torch.Tensor], kept: str) -> None:
    assert m.b.weight is m.a.weight
    assert isinstance(m.a, nn.Linear) and m.a.in_features == 4
    assert isinstance(m.b, nn.Linear) and m.b.in_features == 4
    assert torch.equal(m.a.weight, sd[kept])
    assert torch.equal(m.a.bias, sd["a.bias"]) and torch.equal(m.b.bias, sd["b.bias"])
    assert not m.a.weight.is_meta


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_tie_saved_under_first_key(loader: str) -> None:
    sd = _saved_once("b.weight")
    m = Tied(lambda: dnn.Linear(4))
    if loader == "di":
        result = di.load_state_dict(m, sd, strict=False)
    else:
        result = m.load_state_dict(sd, strict=False)
    assert result == _eager_result(sd)
    assert result.missing_keys == ["b.weight"] and result.unexpected_keys == []
    _check(m, sd, "a.weight")


def test_tie_saved_under_second_key_di() -> None:
    # The key kept is the later layer's: the earlier layer takes its sizes from it.
    sd = _saved_once("a.weight", tie_first=True)
    m = Tied(lambda: dnn.Linear(4), tie_first=True)
    result = di.load_state_dict(m, sd, strict=False)
    assert result == _eager_result(sd, tie_first=True)
    assert result.missing_keys == ["a.weight"]
    assert isinstance(m.a, nn.Linear) and isinstance(m.b, nn.Linear)
    assert m.a.weight is m.b.weight
    assert torch.equal(m.b.weight, sd["b.weight"])
    assert torch.equal(m.a.bias, sd["a.bias"])


def test_tie_saved_once_strict_reports_the_dropped_key() -> None:
    sd = _saved_once("b.weight")
    m = Tied(lambda: dnn.Linear(4))
    with pytest.raises(di.DeferredInitError, match=r"missing keys: b\.weight"):
        di.load_state_dict(m, sd)
    assert isinstance(m.a, di.Deferred) and isinstance(m.b, di.Deferred)
    assert m.b.weight is m.a.weight


def test_tie_saved_once_wrong_shape_names_the_layer() -> None:
    sd = _saved_once("b.weight")
    sd["b.bias"] = torch.zeros(5)  # the tie says 4 x 4, the bias says 5
    m = Tied(lambda: dnn.Linear(4))
    with pytest.raises(di.DeferredInitError, match=r"b\.bias \(Linear layer 'b'\)"):
        di.load_state_dict(m, sd, strict=False)
    assert isinstance(m.a, di.Deferred) and isinstance(m.b, di.Deferred)
