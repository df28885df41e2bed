"""Build configs that travel: ``di.build_config`` and ``di.build(module, config=...)``.

A config holds every built layer's inferred arguments by qualified name (with its
class, dtype and device) as JSON data; building from it needs no data, checkpoint
or forward, constructs in registration order (bitwise eager under the same seed),
and refuses a config that does not fit the model with every difference listed and
nothing built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import deferinit as di
from deferinit import nn as dnn
from deferinit.nn import RANK_GENERIC, TWINS
from test_layers import CASES, Case, eager, r, twin

AssertSameState = Callable[[nn.Module, nn.Module], None]


class Holder(nn.Module):
    """One layer under a qualified name, called with every forward argument."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any) -> Any:
        return self.layer(*args)


def built_from_data(case: Case) -> nn.Module:
    source = Holder(twin(case))
    source(*case.inputs())
    return source


def through_json(cfg: dict[str, Any]) -> Any:
    return json.loads(json.dumps(cfg))


# Twins test_layers has no case for yet.
_EXTRA = [
    Case(
        "Transformer",
        nn.Transformer,
        {
            "nhead": 2,
            "num_encoder_layers": 1,
            "num_decoder_layers": 1,
            "dim_feedforward": 16,
            "dropout": 0.0,
        },
        {"d_model": 8},
        lambda: (r(5, 3, 8), r(4, 3, 8)),
    ),
]
ROUND_TRIP = CASES + [c for c in _EXTRA if c.cls not in {case.cls for case in CASES}]


def test_the_round_trip_covers_every_twin() -> None:
    assert {c.cls for c in ROUND_TRIP} >= set(TWINS)
    assert {getattr(dnn, name)._di_cls for name in RANK_GENERIC_TWINS} == set(RANK_GENERIC)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in ROUND_TRIP])
def test_every_twin_builds_from_its_config_as_eager(
    case: Case, assert_same_state: AssertSameState
) -> None:
    cfg = di.build_config(built_from_data(case))
    assert through_json(cfg) == cfg
    torch.manual_seed(0)
    want = Holder(eager(case))
    torch.manual_seed(0)
    got = di.build(Holder(twin(case)), config=through_json(cfg))
    assert type(got.layer) is case.cls
    assert repr(got) == repr(want)
    assert_same_state(got, want)
    assert di.build_config(got) == cfg


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=c.marks)
        for c in CASES
        if c.id in {"Linear", "LSTM", "MultiheadAttention", "InstanceNorm2d", "LayerNorm-ndim2"}
    ],
)
def test_a_config_builds_on_meta_and_materializes_as_eager(
    case: Case, assert_same_state: AssertSameState
) -> None:
    cfg = through_json(di.build_config(built_from_data(case)))
    got = di.build(Holder(twin(case)), config=cfg, device="meta")
    assert all(t.is_meta for t in [*got.parameters(), *got.buffers()])
    torch.manual_seed(0)
    want = Holder(eager(case))
    torch.manual_seed(0)
    di.materialize(got)
    assert_same_state(got, want)


# Rank-generic twin -> (its arguments, which are torch's too besides the input's
# channels, and the torch classes it becomes for 1, 2 and 3 spatial dims).
RANK_GENERIC_TWINS: dict[str, tuple[dict[str, Any], tuple[type[nn.Module], ...]]] = {
    "Conv": ({"out_channels": 4, "kernel_size": 3}, (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
    "ConvTranspose": (
        {"out_channels": 2, "kernel_size": 2},
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    ),
    "BatchNorm": ({}, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
    "InstanceNorm": (
        {"affine": True},
        (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    ),
}


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("name", list(RANK_GENERIC_TWINS))
def test_rank_generic_twins_build_from_their_config_as_eager(
    name: str, spatial: int, assert_same_state: AssertSameState
) -> None:
    given, classes = RANK_GENERIC_TWINS[name]
    source = Holder(getattr(dnn, name)(**given))
    source(torch.randn(2, 3, *(5,) * spatial))
    cfg = through_json(di.build_config(source))
    assert cfg["layers"]["layer"]["arguments"]["spatial_dims"] == spatial
    torch.manual_seed(0)
    in_name = "num_features" if "Norm" in name else "in_channels"
    want = Holder(classes[spatial - 1](**{in_name: 3}, **given))
    torch.manual_seed(0)
    got = di.build(Holder(getattr(dnn, name)(**given)), config=cfg)
    assert type(got.layer) is classes[spatial - 1]
    assert_same_state(got, want)


def test_a_twin_at_the_root_is_named_by_the_empty_name(assert_same_state: AssertSameState) -> None:
    source = dnn.Linear(3)
    source(torch.randn(2, 5))
    cfg = di.build_config(source)
    assert list(cfg["layers"]) == [""]
    torch.manual_seed(1)
    want = nn.Linear(5, 3)
    torch.manual_seed(1)
    assert_same_state(di.build(dnn.Linear(3), config=cfg), want)


def test_the_format_is_versioned_json_with_class_dtype_and_device(tmp_path: Path) -> None:
    with torch.device("meta"):
        net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.BatchNorm1d(), dnn.LayerNorm(ndim=2))
    di.build(net, (4, 3, 5), device="meta")
    cfg = di.build_config(net)
    path = tmp_path / "build_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    assert (
        json.loads(path.read_text())
        == cfg
        == {
            "format": "deferinit.build_config",
            "version": 1,
            "layers": {
                "0": {
                    "class": "deferinit.nn.Linear",
                    "arguments": {"in_features": 5},
                    "dtype": "float32",
                    "device": "meta",
                },
                "2": {
                    "class": "deferinit.nn.BatchNorm1d",
                    "arguments": {"num_features": 3},
                    "dtype": "float32",
                    "device": "meta",
                },
                "3": {
                    "class": "deferinit.nn.LayerNorm",
                    "arguments": {"normalized_shape": [3, 8]},
                    "dtype": "float32",
                    "device": "meta",
                },
            },
        }
    )


def test_dtype_and_device_are_read_not_applied(assert_same_state: AssertSameState) -> None:
    # The config says what the layer held; the model builds under its own
    # declared defaults (and device=), as eager code would.
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        source = dnn.Linear(3)
    finally:
        torch.set_default_dtype(saved)
    source(torch.randn(2, 5, dtype=torch.float64))
    cfg = di.build_config(source)
    assert cfg["layers"][""]["dtype"] == "float64"
    torch.manual_seed(2)
    want = nn.Linear(5, 3)
    torch.manual_seed(2)
    got = di.build(dnn.Linear(3), config=cfg)
    assert got.weight.dtype == torch.float32
    assert_same_state(got, want)


def test_layers_are_built_in_registration_order_whatever_the_forward_order(
    assert_same_state: AssertSameState,
) -> None:
    class Backwards(nn.Module):
        def __init__(self, first: nn.Module, second: nn.Module) -> None:
            super().__init__()
            self.first = first
            self.second = second

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.first(self.second(x))
            return out

    source = Backwards(dnn.Linear(2), dnn.Linear(4))
    source(torch.randn(3, 6))
    cfg = through_json(di.build_config(source))
    torch.manual_seed(3)
    want = Backwards(nn.Linear(4, 2), nn.Linear(6, 4))
    torch.manual_seed(3)
    assert_same_state(di.build(Backwards(dnn.Linear(2), dnn.Linear(4)), config=cfg), want)


# --- di.defer'd classes ------------------------------------------------------------------


class Block(nn.Module):
    """A user block: an eager Linear and a deferred LayerNorm of its own."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = dnn.LayerNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(torch.relu(self.proj(x)))
        return out


def last_size(x: torch.Tensor) -> int:
    return x.shape[-1]


LazyBlock = di.defer(Block, in_dim=di.dim(-1))
LazyBlockByCallable = di.defer(Block, in_dim=last_size)


@pytest.mark.parametrize("lazy", [LazyBlock, LazyBlockByCallable], ids=["dim", "callable"])
def test_deferred_user_classes_and_what_they_construct_round_trip(
    lazy: type[di.Deferred], assert_same_state: AssertSameState
) -> None:
    source = nn.Sequential(lazy(out_dim=8), lazy(out_dim=4))
    source(torch.randn(2, 20))
    cfg = through_json(di.build_config(source))
    assert list(cfg["layers"]) == ["0", "0.norm", "1", "1.norm"]
    assert cfg["layers"]["0"]["class"] == f"{__name__}.Block"
    assert cfg["layers"]["1"]["arguments"] == {"in_dim": 8}
    torch.manual_seed(4)
    want = nn.Sequential(Block(20, 8), Block(8, 4))
    want(torch.randn(2, 20))  # builds the LayerNorms (no random numbers)
    torch.manual_seed(4)
    got = di.build(nn.Sequential(lazy(out_dim=8), lazy(out_dim=4)), config=cfg)
    assert di.is_built(got)
    assert_same_state(got, want)


def test_instance_norm_without_affine_builds_from_a_config_where_a_checkpoint_cannot(
    assert_same_state: AssertSameState,
) -> None:
    def model() -> nn.Sequential:
        return nn.Sequential(dnn.Conv2d(4, 3), dnn.InstanceNorm2d(), dnn.Linear(2))

    source = model()
    source(torch.randn(2, 3, 6, 6))
    cfg = through_json(di.build_config(source))
    target = model()
    di.load_state_dict(target, source.state_dict())
    assert di.pending(target) == ["1"]  # no tensor says its num_features
    di.build(target, config=cfg)
    assert target[1].num_features == 4
    assert_same_state(target, source)


# --- configs that do not fit --------------------------------------------------------------


def untouched(model: nn.Module) -> Callable[[], None]:
    """A check that ``model`` is exactly as now: the same tensor objects of the same
    classes and values, the same pending layers and repr, and the default random
    generator where it was."""
    tensors = model.state_dict(keep_vars=True)
    objects = [(n, id(t), type(t)) for n, t in tensors.items()]
    values = {n: t.detach().clone() for n, t in tensors.items() if not is_lazy(t)}
    pending = di.pending(model)
    shown = repr(model)
    rng = torch.get_rng_state()

    def check() -> None:
        now = model.state_dict(keep_vars=True)
        assert [(n, id(t), type(t)) for n, t in now.items()] == objects
        assert all(torch.equal(now[n], v) for n, v in values.items())
        assert di.pending(model) == pending
        assert repr(model) == shown
        assert torch.equal(torch.get_rng_state(), rng)

    return check


def test_every_difference_is_listed_and_nothing_is_built() -> None:
    source = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(4), dnn.Linear(2))
    source(torch.randn(2, 5))
    cfg = through_json(di.build_config(source))
    cfg["layers"]["0"]["arguments"] = {"in_feature": 5}  # wrong argument name
    cfg["layers"]["1"] = cfg["layers"]["3"]  # a ReLU: not a layer deferinit builds
    cfg["layers"]["2"]["class"] = "deferinit.nn.Linear"  # the model has a Conv1d there
    del cfg["layers"]["3"]  # missing layer
    cfg["layers"]["head"] = cfg["layers"]["2"]  # unknown name
    model = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Conv1d(4, 3), dnn.Linear(2))
    check = untouched(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.build(model, config=cfg)
    message = str(caught.value)
    assert "does not fit Sequential (5 differences)" in message
    assert "'0' (Linear): the config gives arguments in_feature; the layer infers in_features" in (
        message
    )
    assert "'1' is a ReLU, which deferinit does not build" in message
    assert "'2' (Conv1d): the config's class is deferinit.nn.Linear" in message
    assert "'3' (Linear) is deferred and the config has no entry" in message
    assert "'head': the model has no layer of that name" in message
    assert "Nothing was built" in message
    check()


def test_a_difference_only_the_build_shows_undoes_it() -> None:
    # The block's LayerNorm exists only once the block is built: the walk builds
    # the block (drawing its Linear's values), meets the LayerNorm, finds another
    # class in the config, and undoes everything, generator included.
    source = nn.Sequential(LazyBlock(out_dim=8), dnn.Linear(2))
    source(torch.randn(2, 20))
    cfg = through_json(di.build_config(source))
    cfg["layers"]["0.norm"]["class"] = "deferinit.nn.RMSNorm"
    model = nn.Sequential(LazyBlock(out_dim=8), dnn.Linear(2))
    check = untouched(model)
    with pytest.raises(di.DeferredInitError, match=r"'0.norm' \(LayerNorm\): the config's class"):
        di.build(model, config=cfg)
    check()
    di.build(model, config=through_json(di.build_config(source)))  # a corrected call builds
    assert di.is_built(model)


def test_a_value_given_or_built_must_agree_with_the_config() -> None:
    source = nn.Sequential(dnn.Bilinear(4), dnn.Linear(3))
    source[1](source[0](torch.randn(2, 5), torch.randn(2, 6)))
    cfg = through_json(di.build_config(source))
    model = nn.Sequential(dnn.Bilinear(4, in1_features=7), dnn.Linear(3, in_features=9))
    check = untouched(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.build(model, config=cfg)
    assert "'0' (Bilinear): given in1_features=7, the config says in1_features=5" in str(
        caught.value
    )
    assert "'1' (Linear): built with in_features=9, the config says in_features=4" in str(
        caught.value
    )
    check()


def test_layers_already_built_with_the_same_arguments_are_left_as_they_are() -> None:
    source = nn.Sequential(dnn.Linear(4), dnn.Linear(3))
    source(torch.randn(2, 5))
    model = nn.Sequential(dnn.Linear(4, in_features=5), dnn.Linear(3))
    first = model[0].get_parameter("weight")
    values = first.detach().clone()
    di.build(model, config=di.build_config(source))
    assert di.is_built(model)
    assert model[0].get_parameter("weight") is first and torch.equal(first, values)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ([1, 2], "config= takes what di.build_config returns .*got a list"),
        ({"0": {}}, r"got a dict with keys '0'"),
        (
            {"format": "other", "version": 7, "layers": {}},
            "its format is 'other' version 7; this deferinit reads 'deferinit.build_config'",
        ),
        ({"layers": {"0": {"class": "Linear"}}}, r"'0': an entry needs 'class'"),
        (
            {"layers": {"0": {"class": "Linear", "arguments": {"in_features": object()}}}},
            r"'0': an entry needs 'class' .* \(JSON values by name\)",
        ),
    ],
    ids=["not a mapping", "no layers", "format", "no arguments", "not JSON"],
)
def test_a_malformed_config_is_refused(config: Any, match: str) -> None:
    model = nn.Sequential(dnn.Linear(3))
    check = untouched(model)
    with pytest.raises(di.DeferredInitError, match=match):
        di.build(model, config=config)
    check()


def test_examples_and_a_config_together_are_refused() -> None:
    with pytest.raises(TypeError, match="examples or config=, not both"):
        di.build(dnn.Linear(3), (2, 4), config={"layers": {}})


def test_a_config_of_an_unbuilt_model_is_refused_naming_its_layers() -> None:
    net = nn.Sequential(dnn.Linear(3), nn.ReLU(), dnn.Linear(2))
    with pytest.raises(di.NotBuiltError, match=r"layer\(s\) '0', '2' are not built yet"):
        di.build_config(net)


class Cast(nn.Module):
    def __init__(self, kind: torch.dtype) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.kind)


def dtype_of(x: torch.Tensor) -> torch.dtype:
    return x.dtype


def test_an_argument_json_cannot_hold_is_refused_naming_the_layer() -> None:
    net = nn.Sequential(di.defer(Cast, kind=dtype_of)())
    net(torch.randn(2))
    with pytest.raises(di.DeferredInitError, match=r"layer '0' was built with kind=torch.float32"):
        di.build_config(net)


def test_a_model_without_deferred_layers_has_an_empty_config() -> None:
    net = nn.Sequential(nn.Linear(2, 3))
    cfg = di.build_config(net)
    assert cfg["layers"] == {}
    assert di.build(net, config=cfg) is net
