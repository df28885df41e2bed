"""Rank-generic twins: ``dnn.Conv``, ``dnn.ConvTranspose``, ``dnn.BatchNorm`` and
``dnn.InstanceNorm`` build the 1d, 2d or 3d torch class from a batched input's
rank, and are then exactly that class. Inputs are made before ``torch.manual_seed``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit.nn import RANK_GENERIC, SpatialDims

AssertSameState = Callable[[nn.Module, nn.Module], None]


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[type[nn.Module], type[nn.Module], type[nn.Module]]
    kwargs: dict[str, Any]  # torch's arguments, minus the inferred size
    size: str  # the inferred size's name
    shapes: dict[int, tuple[int, ...]]  # spatial dims -> a batched input of that rank
    unbatched: tuple[int, ...]  # refused: ambiguous


FAMILIES = [
    Family(
        "Conv",
        (nn.Conv1d, nn.Conv2d, nn.Conv3d),
        {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
        "in_channels",
        {1: (2, 3, 9), 2: (2, 3, 6, 5), 3: (1, 3, 4, 5, 4)},
        (3, 9),
    ),
    Family(
        "ConvTranspose",
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        {"out_channels": 2, "kernel_size": 2, "stride": 2, "groups": 1},
        "in_channels",
        {1: (2, 3, 5), 2: (2, 3, 4, 3), 3: (1, 3, 2, 3, 2)},
        (3, 5),
    ),
    Family(
        "BatchNorm",
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        {"momentum": 0.2, "eps": 1e-3},
        "num_features",
        {1: (4, 3, 5), 2: (2, 3, 4, 4), 3: (2, 3, 2, 3, 2)},
        (3,),
    ),
    Family(
        "InstanceNorm",
        (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        {"affine": True, "track_running_stats": True},
        "num_features",
        {1: (2, 3, 6), 2: (2, 3, 4, 4), 3: (2, 3, 2, 3, 2)},
        (3, 6),
    ),
]
FAMILY_PARAMS = [pytest.param(f, id=f.name) for f in FAMILIES]
RANKED = [pytest.param(f, n, id=f"{f.name}-{n}d") for f in FAMILIES for n in sorted(f.shapes)]


def twin(family: Family, **more: Any) -> nn.Module:
    made: nn.Module = getattr(dnn, family.name)(**family.kwargs, **more)
    return made


def eager(family: Family, spatial: int, channels: int = 3) -> nn.Module:
    return family.classes[spatial - 1](channels, **family.kwargs)


def kind(module: nn.Module) -> type[nn.Module]:
    """``type(module)``, which a build changes under mypy's feet."""
    return type(module)


def test_every_rank_generic_twin_has_a_family_here() -> None:
    assert {f.name for f in FAMILIES} == {factory.__name__ for factory in RANK_GENERIC}
    for factory in RANK_GENERIC:
        assert factory.__name__ in dnn.__all__


@pytest.mark.parametrize(("family", "spatial"), RANKED)
def test_builds_exactly_the_torch_class_of_the_input_rank_bitwise(
    family: Family, spatial: int, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(family.shapes[spatial])
    layer = twin(family)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    reference = eager(family, spatial)
    assert kind(layer) is family.classes[spatial - 1]
    assert repr(layer) == repr(reference)
    assert torch.equal(out, reference(x))
    assert_same_state(layer, reference)  # running statistics updated alike


@pytest.mark.parametrize(("family", "spatial"), RANKED)
def test_di_build_and_meta_build_then_materialize_equal_eager(
    family: Family, spatial: int, assert_same_state: AssertSameState
) -> None:
    shape = family.shapes[spatial]
    for device in (None, "meta"):
        layer = twin(family)
        torch.manual_seed(0)
        di.build(layer, shape, device=device)
        if device == "meta":
            assert all(t.is_meta for t in layer.parameters())
            torch.manual_seed(0)
            di.materialize(layer)
        torch.manual_seed(0)
        assert kind(layer) is family.classes[spatial - 1]
        assert_same_state(layer, eager(family, spatial))


def test_batch_norm_takes_n_c_input_as_batch_norm_1d() -> None:
    layer = dnn.BatchNorm()
    layer(torch.randn(4, 3))
    assert kind(layer) is nn.BatchNorm1d and layer.num_features == 3


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_unbatched_or_other_rank_input_is_an_inference_error_naming_the_explicit_classes(
    family: Family,
) -> None:
    net = nn.Sequential(twin(family))
    layer = net[0]
    before = [(n, t) for n, t in [*layer.named_parameters(), *layer.named_buffers()]]
    explicit = f"dnn.{family.name}1d, dnn.{family.name}2d or dnn.{family.name}3d"
    ranks = "2, 3, 4 or 5" if family.name == "BatchNorm" else "3, 4 or 5"
    for shape in (family.unbatched, (1, 2, 3, 2, 3, 2)):
        x = torch.randn(shape)
        expected = (
            f"expected a batched input (N, C, *spatial) of {ranks} dimensions (an unbatched "
            f"input is ambiguous: for it use {explicit} explicitly), got a float32 tensor of "
            f"shape {tuple(shape)!r}. Fix:"
        )
        match = rf"^{family.name} layer '0' cannot infer spatial_dims .*{re.escape(expected)}"
        with pytest.raises(di.InferenceError, match=match):
            net(x)
        assert type(layer) is getattr(dnn, family.name)
        now = [(n, t) for n, t in [*layer.named_parameters(), *layer.named_buffers()]]
        assert [n for n, _ in now] == [n for n, _ in before]
        assert all(a is b for (_, a), (_, b) in zip(now, before, strict=True))
    net(torch.randn(family.shapes[2]))
    assert kind(layer) is family.classes[1]


def test_changed_rank_after_build_is_a_shape_mismatch_naming_spatial_dims() -> None:
    net = nn.Sequential(dnn.Conv(4, 3))
    net(torch.randn(2, 3, 5, 5))
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"'0' was built for spatial_dims=2 .*would need spatial_dims=1.*di\.reset",
    ):
        net(torch.randn(2, 3, 5))


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_reset_forgets_the_rank_and_keeps_the_parameter_objects(family: Family) -> None:
    layer = twin(family)
    before = list(layer.parameters())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(family.shapes[1]))
    assert kind(layer) is family.classes[0]
    di.reset(layer)
    assert kind(layer) is getattr(dnn, family.name)
    out = layer(torch.randn(family.shapes[3]))
    assert kind(layer) is family.classes[2]
    after = list(layer.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))
    out.float().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_explicit_spatial_dims_and_size_build_at_once(
    family: Family, assert_same_state: AssertSameState
) -> None:
    torch.manual_seed(0)
    layer = twin(family, spatial_dims=3, **{family.size: 3})
    torch.manual_seed(0)
    assert kind(layer) is family.classes[2]
    assert_same_state(layer, eager(family, 3))


def test_spatial_dims_other_than_1_2_3_is_refused_at_declaration() -> None:
    with pytest.raises(TypeError, match=r"spatial_dims must be 1, 2 or 3 .*got 4"):
        dnn.Conv(4, 3, spatial_dims=4)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_signature_is_torchs_minus_the_inferred_size(family: Family) -> None:
    shown = inspect.signature(getattr(dnn, family.name)).parameters
    torch_params = list(inspect.signature(family.classes[1].__init__).parameters.values())[1:]
    assert list(shown) == [p.name for p in torch_params if p.name != family.size]
    assert all(shown[p.name].default == p.default for p in torch_params if p.name in shown)


def test_repr_before_build_shows_the_arguments_as_given() -> None:
    assert repr(dnn.Conv(16, 3)) == (
        "Conv(in_channels=?, out_channels=16, kernel_size=3, spatial_dims=?)"
    )
    assert (
        repr(dnn.BatchNorm(momentum=0.3))
        == "BatchNorm(num_features=?, momentum=0.3, spatial_dims=?)"
    )


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_docstring_says_where_rank_and_size_come_from(family: Family) -> None:
    doc = getattr(dnn, family.name).__doc__ or ""
    assert "spatial_dims: inferred from ``input.dim()`` (" in doc
    assert f"{family.size}: inferred from ``input.shape[1]``" in doc
    assert f"``dnn.{family.name}1d``" in doc


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_state_dict_keys_before_build_equal_eager_and_copies_work(family: Family) -> None:
    layer = twin(family)
    keys = list(eager(family, 2).state_dict())
    assert list(layer.state_dict()) == keys
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(copied) is getattr(dnn, family.name)
        copied(torch.randn(family.shapes[2]))
        assert kind(copied) is family.classes[1]
    layer(torch.randn(family.shapes[1]))
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert kind(copied) is family.classes[0]


def test_summary_before_build_leaves_the_rank_dependent_shapes_unknown() -> None:
    net = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm())
    rows = di.summary(net).rows
    assert [p.shape for p in rows[0].parameters] == [None, (4,)]  # weight's rank unknown
    assert repr(rows[0].arguments["spatial_dims"]) == "?"
    rows = di.summary(net, (2, 3, 9)).rows
    assert rows[0].arguments == {"spatial_dims": 1, "in_channels": 3}
    assert [p.shape for p in rows[0].parameters] == [(4, 3, 3), (4,)]
    assert rows[1].arguments == {"spatial_dims": 1, "num_features": 4}
    net(torch.randn(2, 3, 9))
    assert [row.layer for row in di.summary(net).rows] == ["Conv1d", "BatchNorm1d"]


def test_a_small_network_of_rank_generic_layers_serves_every_rank(
    assert_same_state: AssertSameState,
) -> None:
    def generic() -> nn.Module:
        return nn.Sequential(
            dnn.Conv(8, 3, padding=1), dnn.BatchNorm(), nn.ReLU(), dnn.ConvTranspose(4, 2, stride=2)
        )

    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for spatial, shape in ((1, (2, 3, 8)), (2, (2, 3, 6, 6)), (3, (1, 3, 4, 4, 4))):
        net = generic()
        torch.manual_seed(0)
        di.build(net, shape)
        torch.manual_seed(0)
        k = spatial - 1
        reference = nn.Sequential(
            conv[k](3, 8, 3, padding=1), norm[k](8), nn.ReLU(), up[k](8, 4, 2, stride=2)
        )
        assert_same_state(net, reference)


@pytest.mark.parametrize("factory", list(RANK_GENERIC), ids=lambda f: f.__name__)
def test_rank_rules_are_frozen_values_that_pickle(factory: type[nn.Module]) -> None:
    rule = RANK_GENERIC[factory]["spatial_dims"]  # type: ignore[index]
    assert isinstance(rule, SpatialDims)
    assert pickle.loads(pickle.dumps(rule)) == rule and hash(copy.copy(rule)) == hash(rule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.family = "Linear"  # type: ignore[misc]


# -- checkpoints: sizes from saved shapes -----------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_checkpoint_gives_the_convolutions_rank_from_its_weight(
    spatial: int, assert_same_state: AssertSameState
) -> None:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
    up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial - 1]
    saved = nn.Sequential(conv(3, 4, 3), nn.ReLU(), up(4, 2, 2))
    net = nn.Sequential(dnn.Conv(4, 3), nn.ReLU(), dnn.ConvTranspose(2, 2))
    di.load_state_dict(net, saved.state_dict())
    assert [type(m) for m in net] == [type(m) for m in saved]
    assert_same_state(net, saved)


def test_checkpoint_cannot_tell_a_norms_rank_and_says_so() -> None:
    net = nn.Sequential(dnn.BatchNorm())
    with pytest.raises(
        di.DeferredInitError,
        match=r"spatial_dims cannot be read off it: .*BatchNorm1d, BatchNorm2d and BatchNorm3d "
        r"hold tensors of the same shapes",
    ):
        di.load_state_dict(net, nn.Sequential(nn.BatchNorm2d(3)).state_dict())
    assert type(net[0]) is dnn.BatchNorm


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_checkpoint_sizes_a_layer_whose_rank_is_given(
    family: Family, assert_same_state: AssertSameState
) -> None:
    saved = eager(family, 3, channels=5)
    torch.nn.init.uniform_(saved.get_parameter("weight"))
    layer = twin(family, spatial_dims=3)
    di.load_state_dict(layer, saved.state_dict())
    assert kind(layer) is family.classes[2]
    assert_same_state(layer, saved)
