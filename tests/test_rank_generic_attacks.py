"""Adversarial tests of the rank-generic twins ``dnn.Conv``, ``dnn.ConvTranspose``,
``dnn.BatchNorm``, ``dnn.InstanceNorm`` and of the ``dnn.Transformer`` twin.

Every rank on every path (first forward, ``di.build``, ``di.build`` on meta then
``di.materialize``) with arguments other than torch's defaults, checkpoints, reset
then another rank, build configs, summaries, copies, compile: each test pins
behaviour that holds, against the eager torch class of that rank. Inputs are made
before ``torch.manual_seed``: a deferred layer draws at its build.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Factory = Callable[..., nn.Module]


def states_equal(got: nn.Module, want: nn.Module) -> list[str]:
    """Keys whose tensors differ in class, dtype, shape or any bit ([] = equal)."""
    a, b = got.state_dict(), want.state_dict()
    assert list(a) == list(b)
    return [
        k
        for k in b
        if type(a[k]) is not type(b[k])
        or a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(a[k], b[k])
    ]


def kind(module: nn.Module) -> type[nn.Module]:
    """``type(module)``, which a build changes under mypy's feet."""
    return type(module)


CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
UP = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SHAPES = {1: (2, 4, 9), 2: (2, 4, 7, 6), 3: (1, 4, 5, 6, 5)}


@dataclass(frozen=True)
class Case:
    id: str
    twin: Factory  # (**factory kwargs) -> the rank-generic twin
    eager: Callable[[int], Factory]  # spatial dims -> (**factory kwargs) -> eager layer
    float64: bool = False


CASES = [
    Case(
        "Conv-same-reflect-groups",
        lambda **f: dnn.Conv(
            6, 3, padding="same", padding_mode="reflect", dilation=2, groups=2, bias=False, **f
        ),
        lambda s: (
            lambda **f: CONV[s - 1](
                4,
                6,
                3,
                padding="same",
                padding_mode="reflect",
                dilation=2,
                groups=2,
                bias=False,
                **f,
            )
        ),
    ),
    Case(
        "Conv-float64",
        lambda **f: dnn.Conv(3, 2, stride=2, padding=1, dtype=torch.float64, **f),
        lambda s: lambda **f: CONV[s - 1](4, 3, 2, stride=2, padding=1, dtype=torch.float64, **f),
        float64=True,
    ),
    Case(
        "ConvTranspose-groups-output-padding",
        lambda **f: dnn.ConvTranspose(6, 3, stride=2, padding=1, output_padding=1, groups=2, **f),
        lambda s: (
            lambda **f: UP[s - 1](4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, **f)
        ),
    ),
    Case(
        "BatchNorm-float64",
        lambda **f: dnn.BatchNorm(eps=1e-3, momentum=None, dtype=torch.float64, **f),
        lambda s: lambda **f: BATCH[s - 1](4, eps=1e-3, momentum=None, dtype=torch.float64, **f),
        float64=True,
    ),
    Case(
        "BatchNorm-no-affine",
        lambda **f: dnn.BatchNorm(affine=False, momentum=0.5, **f),
        lambda s: lambda **f: BATCH[s - 1](4, affine=False, momentum=0.5, **f),
    ),
    Case(
        "InstanceNorm-affine-running",
        lambda **f: dnn.InstanceNorm(affine=True, track_running_stats=True, momentum=0.3, **f),
        lambda s: (
            lambda **f: INSTANCE[s - 1](4, affine=True, track_running_stats=True, momentum=0.3, **f)
        ),
    ),
]


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
@pytest.mark.parametrize("path", ["forward", "build", "meta"])
def test_every_rank_and_path_equals_the_eager_layer_of_that_rank(
    case: Case, spatial: int, path: str
) -> None:
    dtype = torch.float64 if case.float64 else torch.float32
    x = torch.randn(SHAPES[spatial], dtype=dtype)
    layer = case.twin()
    torch.manual_seed(0)
    if path == "forward":
        out = layer(x)
    elif path == "build":
        out = di.build(layer, x)(x)
    else:
        di.build(layer, x, device="meta")
        assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
        torch.manual_seed(0)
        out = di.materialize(layer)(x)
    torch.manual_seed(0)
    eager = case.eager(spatial)()
    assert kind(layer) is type(eager) and repr(layer) == repr(eager)
    want = eager(x)
    assert states_equal(layer, eager) == []
    assert torch.equal(out, want) and out.dtype == dtype


@pytest.mark.parametrize("spatial", [1, 3])
def test_declared_on_meta_with_factory_kwargs_materializes_to_eager(spatial: int) -> None:
    layer = dnn.Conv(4, 3, dtype=torch.float64, device="meta")
    di.build(layer, torch.empty(SHAPES[spatial], dtype=torch.float64, device="meta"))
    assert layer.weight.is_meta
    torch.manual_seed(0)
    di.materialize(layer, device="cpu")
    torch.manual_seed(0)
    assert states_equal(layer, CONV[spatial - 1](4, 4, 3, dtype=torch.float64)) == []


def test_double_before_the_build_equals_eager_constructed_then_converted() -> None:
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    layer = dnn.Conv(4, 3).double()
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    assert states_equal(layer, nn.Conv1d(3, 4, 3).double()) == []


def test_materialize_dtype_converts_floats_and_keeps_the_count_an_integer() -> None:
    layer = dnn.BatchNorm()
    di.build(layer, (2, 3, 4), device="meta")
    di.materialize(layer, dtype=torch.float64)
    dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
    assert dtypes.pop("num_batches_tracked") == torch.int64
    assert set(dtypes.values()) == {torch.float64}


# -- reset, then another rank ------------------------------------------------------------


@pytest.mark.parametrize(("first", "then"), [(1, 3), (3, 2), (2, 1)])
def test_reset_then_another_rank_builds_the_eager_layer_of_the_new_rank(
    first: int, then: int
) -> None:
    net = nn.Sequential(dnn.Conv(4, 3, padding=1), dnn.BatchNorm(), dnn.ConvTranspose(2, 2))
    objects = [*net.parameters(), *net.buffers()]
    net(torch.randn(SHAPES[first]))
    di.reset(net)
    assert [type(m) for m in net] == [dnn.Conv, dnn.BatchNorm, dnn.ConvTranspose]
    x = torch.randn(SHAPES[then])
    torch.manual_seed(1)
    di.build(net, x)
    torch.manual_seed(1)
    k = then - 1
    eager = nn.Sequential(CONV[k](4, 4, 3, padding=1), BATCH[k](4), UP[k](4, 2, 2))
    assert [type(m) for m in net] == [type(m) for m in eager]
    assert states_equal(net, eager) == []
    assert torch.equal(net(x), eager(x))
    assert all(a is b for a, b in zip([*net.parameters(), *net.buffers()], objects, strict=True))


def test_reset_after_a_meta_build_then_another_rank_materializes_to_eager() -> None:
    layer = dnn.BatchNorm(momentum=0.2)
    di.build(layer, (2, 3), device="meta")
    assert kind(layer) is nn.BatchNorm1d
    di.reset(layer)
    di.build(layer, (2, 5, 4, 4), device="meta")
    torch.manual_seed(0)
    di.materialize(layer)
    assert kind(layer) is nn.BatchNorm2d
    assert states_equal(layer, nn.BatchNorm2d(5, momentum=0.2)) == []


def test_copies_of_a_reset_layer_forget_the_rank_too() -> None:
    layer = dnn.Conv(4, 3)
    layer(torch.randn(2, 3, 5))
    di.reset(layer)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(copied) is dnn.Conv
        copied(torch.randn(1, 3, 4, 4, 4))
        assert kind(copied) is nn.Conv3d


def test_batch_norm_built_from_n_c_also_takes_n_c_l_like_eager() -> None:
    layer = dnn.BatchNorm()
    layer(torch.randn(4, 3))
    assert kind(layer) is nn.BatchNorm1d
    assert layer(torch.randn(4, 3, 5)).shape == (4, 3, 5)


def test_explicit_rank_fed_another_rank_is_refused_and_the_layer_is_left_unbuilt() -> None:
    net = nn.Sequential(dnn.Conv(4, 3, spatial_dims=1))
    layer = net[0]
    before = list(layer.parameters())
    with pytest.raises(di.InferenceError, match=r"'0'.*spatial_dims=1.*left unbuilt"):
        net(torch.randn(2, 3, 5, 5))
    assert type(layer) is dnn.Conv
    assert all(a is b for a, b in zip(layer.parameters(), before, strict=True))
    net(torch.randn(2, 3, 5))
    assert kind(layer) is nn.Conv1d


# -- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [1, 2, 3])
def test_torchs_own_load_state_dict_gives_a_convolution_its_rank_and_size(spatial: int) -> None:
    saved = nn.Sequential(CONV[spatial - 1](3, 4, 3), UP[spatial - 1](4, 2, 2, groups=2))
    net = nn.Sequential(dnn.Conv(4, 3), dnn.ConvTranspose(2, 2, groups=2))
    net.load_state_dict(saved.state_dict())
    assert [type(m) for m in net] == [type(m) for m in saved]
    assert repr(net) == repr(saved)
    assert states_equal(net, saved) == []


def test_torchs_own_load_state_dict_cannot_tell_a_norms_rank_and_leaves_it_deferred() -> None:
    net = nn.Sequential(dnn.BatchNorm())
    placeholder = net[0].weight
    with pytest.raises(RuntimeError, match=r"'0' is not built .*spatial_dims cannot be read off"):
        net.load_state_dict(nn.Sequential(nn.BatchNorm2d(3)).state_dict())
    assert type(net[0]) is dnn.BatchNorm and net[0].weight is placeholder


def test_a_norm_given_its_rank_takes_its_size_from_torchs_load_state_dict() -> None:
    saved = nn.InstanceNorm2d(5, affine=True, track_running_stats=True)
    torch.nn.init.uniform_(saved.weight)
    saved.get_buffer("running_var").uniform_()
    layer = dnn.InstanceNorm(affine=True, track_running_stats=True, spatial_dims=2)
    layer.load_state_dict(saved.state_dict())
    assert kind(layer) is nn.InstanceNorm2d
    assert states_equal(layer, saved) == []


def test_an_unbuilt_state_dict_round_trips_and_leaves_the_layer_deferred() -> None:
    state = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm()).state_dict()
    fresh = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm())
    fresh.load_state_dict(state)
    assert di.pending(fresh) == ["0", "1"]


# -- build configs, summaries, initializers, copies, compile ----------------------------


def test_build_config_round_trip_rebuilds_every_rank_generic_layer_bitwise() -> None:
    def generic() -> nn.Module:
        return nn.Sequential(
            dnn.Conv(4, 3), dnn.BatchNorm(), dnn.InstanceNorm(affine=True), dnn.ConvTranspose(2, 2)
        )

    net = generic()
    torch.manual_seed(0)
    di.build(net, (1, 3, 6, 6, 6))
    config = di.build_config(net)
    assert config["layers"]["0"]["arguments"] == {"spatial_dims": 3, "in_channels": 3}
    again = generic()
    torch.manual_seed(0)
    di.build(again, config=config)
    assert [type(m) for m in again.children()] == [CONV[2], BATCH[2], INSTANCE[2], UP[2]]
    assert states_equal(again, net) == []


def test_build_config_that_contradicts_an_explicit_rank_is_refused_and_nothing_built() -> None:
    source = nn.Sequential(dnn.Conv(4, 3))
    di.build(source, (1, 3, 4, 4, 4))
    target = nn.Sequential(dnn.Conv(4, 3, spatial_dims=2))
    with pytest.raises(
        di.DeferredInitError, match=r"given spatial_dims=2, the config says spatial_dims=3"
    ):
        di.build(target, config=di.build_config(source))
    assert type(target[0]) is dnn.Conv


def test_summary_with_an_example_shows_rank_and_sizes_and_changes_nothing() -> None:
    net = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm(), nn.Flatten(), dnn.Linear(2))
    rows = di.summary(net, (2, 3, 8, 8)).rows
    assert [row.arguments for row in rows] == [
        {"spatial_dims": 2, "in_channels": 3},
        {"spatial_dims": 2, "num_features": 4},
        {},
        {"in_features": 144},
    ]
    assert di.pending(net) == ["0", "1", "3"]
    assert [row.state for row in rows] == ["deferred", "deferred", "built", "deferred"]


def test_a_registered_mapping_initializer_reaches_the_built_class_of_any_rank() -> None:
    net = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm())
    di.initialize(net, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    di.build(net, (2, 3, 8))
    assert torch.equal(net.get_parameter("0.weight"), torch.ones(4, 3, 3))
    assert torch.equal(net.get_parameter("1.weight"), torch.ones(4))
    assert torch.equal(net.get_parameter("0.bias"), torch.zeros(4))


def test_init_queued_on_the_placeholders_runs_after_construction_as_eager() -> None:
    layer = dnn.Conv(4, 3)
    layer.weight.data.normal_(0, 0.01)
    nn.init.zeros_(layer.bias)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    eager = nn.Conv2d(3, 4, 3)
    eager.weight.data.normal_(0, 0.01)
    nn.init.zeros_(eager.get_parameter("bias"))
    assert states_equal(layer, eager) == []


def test_copies_after_the_build_are_the_torch_class_with_the_same_values() -> None:
    layer = dnn.ConvTranspose(4, 2)
    layer(torch.randn(2, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert kind(copied) is nn.ConvTranspose2d
        assert states_equal(copied, layer) == []
        assert torch.equal(copied(x), layer(x))


def test_an_explicit_rank_survives_pickling_before_the_build() -> None:
    layer = dnn.Conv(4, 3, spatial_dims=1)
    copied = pickle.loads(pickle.dumps(layer))
    assert repr(copied) == "Conv(in_channels=?, out_channels=4, kernel_size=3, spatial_dims=1)"
    copied(torch.randn(2, 3, 5))
    assert kind(copied) is nn.Conv1d


# Dynamo warns about a non-leaf .grad while tracing the build's graph break
# (tests/test_compile_export.py notes it for every twin).
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)
def test_compile_before_the_build_builds_the_rank_of_the_first_input() -> None:
    net = nn.Sequential(dnn.Conv(4, 3), dnn.BatchNorm())
    compiled: Any = torch.compile(net, backend="aot_eager")
    x = torch.randn(2, 3, 8)
    out = compiled(x)
    assert [type(m) for m in net] == [nn.Conv1d, nn.BatchNorm1d]
    assert out.shape == (2, 4, 6)


# -- dnn.Transformer -------------------------------------------------------------------


def transformer(**more: Any) -> nn.Module:
    made: nn.Module = dnn.Transformer(
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=8,
        dropout=0.0,
        batch_first=True,
        **more,
    )
    return made


def eager_transformer(d_model: int, **more: Any) -> nn.Module:
    return nn.Transformer(
        d_model=d_model,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=8,
        dropout=0.0,
        batch_first=True,
        **more,
    )


@pytest.mark.parametrize("path", ["forward", "build", "meta"])
@pytest.mark.parametrize(
    "more",
    [{}, {"activation": "gelu", "layer_norm_eps": 1e-3}],
    ids=["plain", "more"],
)
def test_transformer_equals_eager_on_every_path(path: str, more: dict[str, Any]) -> None:
    src, tgt = torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    model = transformer(**more)
    torch.manual_seed(0)
    if path == "forward":
        out = model(src, tgt)
    elif path == "build":
        out = di.build(model, src, tgt)(src, tgt)
    else:
        di.build(model, src, tgt, device="meta")
        torch.manual_seed(0)
        out = di.materialize(model)(src, tgt)
    torch.manual_seed(0)
    eager = eager_transformer(6, **more)
    assert kind(model) is nn.Transformer
    assert states_equal(model, eager) == []
    assert torch.equal(out, eager(src, tgt))


def test_transformer_takes_its_size_from_a_checkpoint_and_pickles_unbuilt() -> None:
    saved = eager_transformer(8)
    model = transformer()
    di.load_state_dict(model, saved.state_dict())
    assert kind(model) is nn.Transformer and model.d_model == 8
    assert states_equal(model, saved) == []
    copied = pickle.loads(pickle.dumps(transformer()))
    copied(torch.randn(2, 5, 4), torch.randn(2, 3, 4))
    assert kind(copied) is nn.Transformer and copied.d_model == 4
