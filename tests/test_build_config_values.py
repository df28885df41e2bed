"""``di.build(config=...)`` checks each inferred value as a forward would (DESIGN
§3.5, §3.10): a size that no input could have given (zero, negative, a bool, a
float, a rank no input has) is refused like a bad input, naming the layer and the
argument, with nothing built. Valid configs of every kind of rule keep loading.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def _config_of(make: Callable[[], nn.Module], *examples: Any) -> dict[str, Any]:
    return di.build_config(di.build(make(), *examples))


@pytest.mark.parametrize("bad", [0, -3, True, False, 2.5, 6.0, "6", [6], None])
def test_a_bad_size_is_refused_naming_layer_and_argument(bad: Any) -> None:
    config = _config_of(lambda: nn.Sequential(dnn.Linear(10)), (2, 6))
    config["layers"]["0"]["arguments"]["in_features"] = bad
    model = nn.Sequential(dnn.Linear(10))
    with pytest.raises(di.DeferredInitError) as caught:
        di.build(model, config=config)
    message = str(caught.value)
    assert "'0'" in message and "in_features=" in message
    assert "Nothing was built" in message
    assert di.pending(model) == ["0"]


@pytest.mark.parametrize(
    ("argument", "bad"),
    [("normalized_shape", [6, 0]), ("normalized_shape", [6]), ("normalized_shape", [6, True])],
)
def test_a_bad_trailing_shape_is_refused(argument: str, bad: Any) -> None:
    config = _config_of(lambda: nn.Sequential(dnn.LayerNorm(ndim=2)), (2, 6, 4))
    config["layers"]["0"]["arguments"][argument] = bad
    model = nn.Sequential(dnn.LayerNorm(ndim=2))
    with pytest.raises(di.DeferredInitError, match=r"'0'.*normalized_shape"):
        di.build(model, config=config)
    assert di.pending(model) == ["0"]


@pytest.mark.parametrize("bad", [0, 4, True, 2.0])
def test_a_bad_rank_is_refused(bad: Any) -> None:
    config = _config_of(lambda: nn.Sequential(dnn.Conv(4, 3)), (2, 3, 8, 8))
    assert config["layers"]["0"]["arguments"]["spatial_dims"] == 2
    config["layers"]["0"]["arguments"]["spatial_dims"] = bad
    model = nn.Sequential(dnn.Conv(4, 3))
    with pytest.raises(di.DeferredInitError, match=r"'0'.*spatial_dims"):
        di.build(model, config=config)
    assert di.pending(model) == ["0"]


def test_a_bad_optional_size_is_refused() -> None:
    def make() -> nn.Module:
        return dnn.MultiheadAttention(num_heads=2)

    q, kv = torch.randn(3, 2, 8), torch.randn(5, 2, 6)
    config = di.build_config(_built(make(), q, kv, kv))
    assert config["layers"][""]["arguments"] == {"embed_dim": 8, "kdim": 6, "vdim": 6}
    config["layers"][""]["arguments"]["kdim"] = 0
    model = make()
    with pytest.raises(di.DeferredInitError, match=r"root \(MultiheadAttention\).*kdim=0"):
        di.build(model, config=config)
    assert di.pending(model) == [""]


def _built(model: nn.Module, *args: Any) -> nn.Module:
    model(*args)
    return model


def _pair(x: torch.Tensor) -> tuple[int, int]:
    return (x.shape[-1], 2)


def _label(x: torch.Tensor) -> str:
    return "mean"


class _Tagged(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mode: str = "sum") -> None:
        super().__init__(in_features, out_features)
        self.mode = mode


# name -> (factory, forward arguments): each built by its first forward.
ROUND_TRIPS: dict[str, tuple[Callable[[], nn.Module], tuple[Any, ...]]] = {
    "Linear": (lambda: nn.Sequential(dnn.Linear(4)), (torch.randn(2, 3),)),
    "LayerNorm ndim=2": (lambda: nn.Sequential(dnn.LayerNorm(ndim=2)), (torch.randn(2, 3, 5),)),
    "RMSNorm": (lambda: nn.Sequential(dnn.RMSNorm()), (torch.randn(2, 5),)),
    "Conv (rank)": (lambda: nn.Sequential(dnn.Conv(4, 3)), (torch.randn(2, 3, 8, 8),)),
    "BatchNorm (rank)": (lambda: nn.Sequential(dnn.BatchNorm()).eval(), (torch.randn(2, 3, 4),)),
    "PReLU per channel": (
        lambda: nn.Sequential(dnn.PReLU(per_channel=True)),
        (torch.randn(2, 3, 4),),
    ),
    "MultiheadAttention kdim": (
        lambda: dnn.MultiheadAttention(num_heads=2),
        (torch.randn(3, 2, 8), torch.randn(5, 2, 6), torch.randn(5, 2, 6)),
    ),
    "MultiheadAttention same": (
        lambda: dnn.MultiheadAttention(num_heads=2),
        (torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)),
    ),
    "GRU": (lambda: nn.Sequential(dnn.GRU(5)), (torch.randn(4, 2, 3),)),
    "Bilinear": (lambda: dnn.Bilinear(4), (torch.randn(2, 3), torch.randn(2, 5))),
    "defer, callable rules": (
        lambda: di.defer(_Tagged, in_features=lambda x: x.shape[-1], mode=_label)(out_features=2),
        (torch.randn(2, 3),),
    ),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_valid_configs_round_trip_through_json(
    name: str, assert_same_state: AssertSameState
) -> None:
    make, args = ROUND_TRIPS[name]
    torch.manual_seed(0)
    built = _built(make(), *args)
    config = json.loads(json.dumps(di.build_config(built)))
    again = make()
    torch.manual_seed(0)
    assert di.build(again, config=config) is again
    assert di.pending(again) == []
    assert_same_state(again, built)
    assert repr(again) == repr(built)


def test_a_callable_rule_value_is_checked_as_its_forward_checks_it() -> None:
    def make() -> nn.Module:
        return nn.Sequential(di.defer(nn.Linear, in_features=lambda x: x.shape[-1])(2))

    config = di.build_config(_built(make(), torch.randn(2, 3)))
    config["layers"]["0"]["arguments"]["in_features"] = 0
    model = make()
    with pytest.raises(di.DeferredInitError, match=r"'0'.*in_features=0"):
        di.build(model, config=config)
    assert di.pending(model) == ["0"]


def test_a_tuple_from_a_callable_rule_loads() -> None:
    pool = di.defer(nn.AdaptiveAvgPool2d, output_size=_pair)
    torch.manual_seed(0)
    built = _built(nn.Sequential(pool()), torch.randn(1, 2, 6, 6))
    config = json.loads(json.dumps(di.build_config(built)))
    assert config["layers"]["0"]["arguments"] == {"output_size": [6, 2]}
    again = nn.Sequential(pool())
    di.build(again, config=config)
    assert again[0].output_size == (6, 2)
