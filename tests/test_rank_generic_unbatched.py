"""A rank-generic twin given ``spatial_dims`` reads its size as the twin of that rank
does: an unbatched input ``(C, *spatial)`` gives the channel from axis 0, as
``dnn.Conv2d`` and torch's forward read it, not from axis 1. Every path equals the
fixed-rank twin and eager torch bitwise. Inputs are made before ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]

# name -> (the 1d, 2d and 3d torch classes, torch's arguments minus the size)
FAMILIES: dict[str, tuple[tuple[type[nn.Module], ...], dict[str, Any]]] = {
    "Conv": ((nn.Conv1d, nn.Conv2d, nn.Conv3d), {"out_channels": 5, "kernel_size": 3}),
    "ConvTranspose": (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        {"out_channels": 2, "kernel_size": 2, "stride": 2},
    ),
    "BatchNorm": ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), {"momentum": 0.2}),
    "InstanceNorm": (
        (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        {"affine": True, "track_running_stats": True},
    ),
}
TAKES_UNBATCHED = ["Conv", "ConvTranspose", "InstanceNorm"]  # torch's BatchNorm never does
CHANNELS = 4  # differs from every spatial size below, so a misread axis shows


def _shape(spatial: int, batched: bool) -> tuple[int, ...]:
    return ((2,) if batched else ()) + (CHANNELS,) + (7, 6, 5)[:spatial]


def kind(module: nn.Module) -> type[nn.Module]:
    """``type(module)``, which a build changes under mypy's feet."""
    return type(module)


def _check_equals_fixed_rank_and_eager(
    name: str,
    spatial: int,
    x: torch.Tensor,
    given: dict[str, Any],
    assert_same_state: AssertSameState,
) -> None:
    classes, kwargs = FAMILIES[name]
    cls = classes[spatial - 1]
    generic = getattr(dnn, name)(**kwargs, **given)
    fixed = getattr(dnn, cls.__name__)(**kwargs)
    torch.manual_seed(0)
    out_generic = generic(x)
    torch.manual_seed(0)
    out_fixed = fixed(x)
    torch.manual_seed(0)
    eager = cls(CHANNELS, **kwargs)
    out_eager = eager(x)
    for layer in (generic, fixed):
        assert kind(layer) is cls
        assert repr(layer) == repr(eager)
        assert_same_state(layer, eager)
    assert torch.equal(out_generic, out_eager) and torch.equal(out_fixed, out_eager)


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("name", TAKES_UNBATCHED)
def test_unbatched_input_with_given_rank_reads_the_channel_from_axis_0(
    name: str, spatial: int, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(_shape(spatial, batched=False))
    _check_equals_fixed_rank_and_eager(
        name, spatial, x, {"spatial_dims": spatial}, assert_same_state
    )


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("rank_given", [True, False], ids=["given", "inferred"])
def test_batched_input_reads_the_channel_from_axis_1_whether_the_rank_is_given_or_not(
    name: str, spatial: int, rank_given: bool, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(_shape(spatial, batched=True))
    given = {"spatial_dims": spatial} if rank_given else {}
    _check_equals_fixed_rank_and_eager(name, spatial, x, given, assert_same_state)


@pytest.mark.parametrize("rank_given", [True, False], ids=["given", "inferred"])
def test_batch_norm_1d_input_n_c_reads_the_channel_from_axis_1(
    rank_given: bool, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(3, CHANNELS)
    given = {"spatial_dims": 1} if rank_given else {}
    _check_equals_fixed_rank_and_eager("BatchNorm", 1, x, given, assert_same_state)


def test_the_reported_case_instance_norm_and_conv_given_two_spatial_dims() -> None:
    x = torch.randn(4, 9, 9)  # unbatched (C=4, H, W)
    norm = dnn.InstanceNorm(spatial_dims=2)
    norm(x)
    assert kind(norm) is nn.InstanceNorm2d and norm.num_features == 4
    conv = dnn.Conv(8, 3, spatial_dims=2)
    assert conv(x).shape == (8, 7, 7)
    assert kind(conv) is nn.Conv2d and conv.in_channels == 4


@pytest.mark.parametrize("name", TAKES_UNBATCHED)
def test_shape_only_build_and_meta_build_of_an_unbatched_shape_equal_eager(
    name: str, assert_same_state: AssertSameState
) -> None:
    classes, kwargs = FAMILIES[name]
    for device in (None, "meta"):
        layer = getattr(dnn, name)(**kwargs, spatial_dims=2)
        torch.manual_seed(0)
        di.build(layer, _shape(2, batched=False), device=device)
        if device == "meta":
            torch.manual_seed(0)
            di.materialize(layer)
        torch.manual_seed(0)
        assert kind(layer) is classes[1]
        assert_same_state(layer, classes[1](CHANNELS, **kwargs))


def test_a_zero_channel_unbatched_input_is_an_inference_error_with_its_own_shape() -> None:
    net = nn.Sequential(dnn.Conv(8, 3, spatial_dims=2))
    with pytest.raises(
        di.InferenceError,
        match=r"^Conv layer '0' cannot infer in_channels \(from input\.shape\[-3\] .*\): "
        r"expected a non-zero size on axis -3 .*got a float32 tensor of shape \(0, 9, 9\)\. "
        r"Fix:",
    ):
        net(torch.randn(0, 9, 9))
    assert type(net[0]) is dnn.Conv


def test_a_changed_channel_count_of_an_unbatched_input_after_the_build_names_it() -> None:
    layer = dnn.InstanceNorm(spatial_dims=2)  # no tensors: the checking guard
    layer(torch.randn(4, 9, 9))
    with pytest.raises(di.ShapeMismatchError, match=r"num_features=4.*num_features=5"):
        layer(torch.randn(5, 9, 9))


def test_an_unbatched_input_is_still_refused_when_the_rank_is_not_given() -> None:
    with pytest.raises(di.InferenceError, match=r"cannot infer spatial_dims .*unbatched"):
        dnn.Conv(8, 3)(torch.randn(4, 9))
    with pytest.raises(di.InferenceError, match=r"cannot infer spatial_dims .*unbatched"):
        dnn.InstanceNorm()(torch.randn(4, 9))


def test_a_changed_channel_of_an_unbatched_input_with_the_rank_given_names_the_channel() -> None:
    conv = dnn.Conv(8, 3, spatial_dims=2)
    conv(torch.randn(4, 9, 9))
    with pytest.raises(di.ShapeMismatchError, match=r"in_channels=4.*in_channels=5") as caught:
        conv(torch.randn(5, 9, 9))
    assert "spatial_dims" not in str(caught.value).split("Fix")[0].split("got")[-1]
