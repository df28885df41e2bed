"""``di.adopt``: torch's own ``nn.Lazy*`` modules become deferinit twins in place.

The models are written as *Dive into Deep Learning* writes them, with ``nn.Lazy*``;
their eager twins are the same models with every size written out. Inputs are made
before ``torch.manual_seed``: a deferred layer draws its initialization at build.
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
from deferinit._lazy import LAZY_TWINS, _Adoption, lazy_modules, refuse_lazy

AssertSameState = Callable[[nn.Module, nn.Module], None]


# -- d2l-style models -----------------------------------------------------------------


def lenet(lazy: bool) -> nn.Module:
    conv = (lambda i, *a, **k: nn.LazyConv2d(*a, **k)) if lazy else nn.Conv2d
    linear = (lambda i, o: nn.LazyLinear(o)) if lazy else nn.Linear
    return nn.Sequential(
        conv(1, 6, kernel_size=5, padding=2),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        conv(6, 16, kernel_size=5),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        linear(16 * 5 * 5, 120),
        nn.Sigmoid(),
        linear(120, 84),
        nn.Sigmoid(),
        linear(84, 10),
    )


def vgg(lazy: bool) -> nn.Module:
    """Two VGG blocks (d2l's ``vgg_block``) and a head with Dropout."""
    conv = (lambda i, o: nn.LazyConv2d(o, kernel_size=3, padding=1)) if lazy else None
    linear = (lambda i, o: nn.LazyLinear(o)) if lazy else nn.Linear

    def block(num_convs: int, in_channels: int, out_channels: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            if conv is not None:
                layers.append(conv(in_channels, out_channels))
            else:
                layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            layers.append(nn.ReLU())
            in_channels = out_channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        return layers

    return nn.Sequential(
        *block(1, 3, 8),
        *block(2, 8, 16),
        nn.Flatten(),
        linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        linear(32, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        linear(32, 10),
    )


class Residual(nn.Module):
    """d2l's ResNet block: registration order (conv1, conv2, conv3, bn1, bn2) is
    not the forward order (conv1, bn1, conv2, bn2, conv3)."""

    def __init__(self, in_channels: int | None, num_channels: int, strides: int = 1) -> None:
        super().__init__()
        if in_channels is None:
            self.conv1: nn.Module = nn.LazyConv2d(num_channels, 3, padding=1, stride=strides)
            self.conv2: nn.Module = nn.LazyConv2d(num_channels, 3, padding=1)
            self.conv3: nn.Module = nn.LazyConv2d(num_channels, 1, stride=strides)
            self.bn1: nn.Module = nn.LazyBatchNorm2d()
            self.bn2: nn.Module = nn.LazyBatchNorm2d()
        else:
            self.conv1 = nn.Conv2d(in_channels, num_channels, 3, padding=1, stride=strides)
            self.conv2 = nn.Conv2d(num_channels, num_channels, 3, padding=1)
            self.conv3 = nn.Conv2d(in_channels, num_channels, 1, stride=strides)
            self.bn1 = nn.BatchNorm2d(num_channels)
            self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.conv3(x))


def resnet_block(lazy: bool) -> nn.Module:
    return Residual(None if lazy else 3, 6, strides=2)


class RNNHead(nn.Module):
    """d2l's RNN language model: an eager GRU, its output layer a LazyLinear."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.rnn = nn.GRU(7, 12)
        self.linear = nn.LazyLinear(7) if lazy else nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        y: torch.Tensor = self.linear(out)
        return y


@dataclass(frozen=True)
class Model:
    id: str
    make: Callable[[bool], nn.Module]
    shape: tuple[int, ...]


MODELS = [
    Model("LeNet", lenet, (2, 1, 28, 28)),
    Model("VGG-blocks-dropout", vgg, (2, 3, 16, 16)),
    Model("ResNet-block", resnet_block, (2, 3, 8, 8)),
    Model("RNN-head", RNNHead, (5, 2, 7)),
]
PARAMS = [pytest.param(m, id=m.id) for m in MODELS]


def _adopted(model: Model) -> nn.Module:
    net = model.make(True)
    assert di.adopt(net) is net
    return net


@pytest.mark.parametrize("model", PARAMS)
def test_adopted_d2l_model_built_with_di_build_equals_eager_bitwise(
    model: Model, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(model.shape)
    torch.manual_seed(0)
    net = _adopted(model)
    di.build(net, x)
    torch.manual_seed(0)
    eager = model.make(False)
    assert_same_state(net, eager)
    assert [type(m) for m in net.modules()] == [type(m) for m in eager.modules()]
    assert repr(net) == repr(eager)
    net.eval(), eager.eval()
    assert torch.equal(net(x), eager(x))


@pytest.mark.parametrize("model", PARAMS)
def test_adopted_d2l_model_built_by_its_first_forward_equals_eager_bitwise(
    model: Model, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(model.shape)
    torch.manual_seed(0)
    net = _adopted(model).eval()  # eval: no dropout draws between the builds
    out = net(x)
    torch.manual_seed(0)
    eager = model.make(False).eval()
    assert_same_state(net, eager)
    assert torch.equal(out, eager(x))


@pytest.mark.parametrize("model", PARAMS)
def test_optimizer_made_before_adoption_trains_the_built_model(model: Model) -> None:
    x = torch.randn(model.shape)
    net = model.make(True)
    before = list(net.parameters())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    di.adopt(net)
    di.build(net, x)
    after = list(net.parameters())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))
    assert all(type(p) is nn.Parameter for p in after)
    values = [p.detach().clone() for p in after]
    net(x).sum().backward()
    optimizer.step()
    assert all(not torch.equal(p, v) for p, v in zip(net.parameters(), values, strict=True))


@pytest.mark.parametrize("model", PARAMS)
def test_state_dict_keys_before_and_after_build_equal_eager(model: Model) -> None:
    net = model.make(True)
    lazy_keys = list(net.state_dict())
    di.adopt(net)
    keys = list(net.state_dict())
    eager_keys = list(model.make(False).state_dict())
    assert keys == eager_keys == lazy_keys
    di.build(net, model.shape)
    assert list(net.state_dict()) == eager_keys


@pytest.mark.parametrize("model", PARAMS)
def test_adopted_model_built_on_meta_then_materialized_equals_eager(
    model: Model, assert_same_state: AssertSameState
) -> None:
    torch.manual_seed(0)
    net = _adopted(model)  # the RNN head's eager GRU draws here, as in eager
    di.build(net, model.shape, device="meta")
    assert all(p.is_meta for n, p in net.named_parameters() if not n.startswith("rnn."))
    di.materialize(net)
    torch.manual_seed(0)
    eager = model.make(False)
    assert_same_state(net, eager)


@pytest.mark.parametrize("model", PARAMS)
def test_adopted_model_takes_its_sizes_from_a_checkpoint(
    model: Model, assert_same_state: AssertSameState
) -> None:
    eager = model.make(False)
    net = _adopted(model)
    before = list(net.parameters())
    di.load_state_dict(net, eager.state_dict())
    assert_same_state(net, eager)
    assert all(a is b for a, b in zip(net.parameters(), before, strict=True))


# -- all 13 classes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    id: str
    lazy: Callable[[], nn.Module]
    eager: Callable[[], nn.Module]
    shape: tuple[int, ...]


# Each with arguments other than torch's defaults.
PAIRS = [
    Pair(
        "Linear", lambda: nn.LazyLinear(5, bias=False), lambda: nn.Linear(3, 5, bias=False), (2, 3)
    ),
    Pair(
        "Conv1d",
        lambda: nn.LazyConv1d(6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False),
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False),
        (2, 4, 11),
    ),
    Pair(
        "Conv2d",
        lambda: nn.LazyConv2d(4, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="circular"),
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), padding_mode="circular"),
        (2, 3, 8, 7),
    ),
    Pair(
        "Conv3d",
        lambda: nn.LazyConv3d(
            2,
            2,
            padding="same",  # type: ignore[arg-type]  # torch's stub; it takes "same"
            dilation=2,
            padding_mode="replicate",  # type: ignore[arg-type]
        ),
        lambda: nn.Conv3d(3, 2, 2, padding="same", dilation=2, padding_mode="replicate"),
        (1, 3, 5, 4, 5),
    ),
    Pair(
        "ConvTranspose1d",
        lambda: nn.LazyConvTranspose1d(6, 3, stride=2, padding=1, output_padding=1, groups=2),
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (2, 4, 7),
    ),
    Pair(
        "ConvTranspose2d",
        lambda: nn.LazyConvTranspose2d(3, (2, 3), stride=2, bias=False, dilation=2),
        lambda: nn.ConvTranspose2d(5, 3, (2, 3), stride=2, bias=False, dilation=2),
        (2, 5, 4, 3),
    ),
    Pair(
        "ConvTranspose3d",
        lambda: nn.LazyConvTranspose3d(2, 2, stride=(1, 2, 1), padding=1),
        lambda: nn.ConvTranspose3d(3, 2, 2, stride=(1, 2, 1), padding=1),
        (1, 3, 4, 3, 4),
    ),
    Pair(
        "BatchNorm1d",
        lambda: nn.LazyBatchNorm1d(eps=1e-3, momentum=0.2, affine=False),
        lambda: nn.BatchNorm1d(3, eps=1e-3, momentum=0.2, affine=False),
        (4, 3, 5),
    ),
    Pair(
        "BatchNorm2d",
        lambda: nn.LazyBatchNorm2d(eps=1e-4, momentum=None),
        lambda: nn.BatchNorm2d(3, eps=1e-4, momentum=None),
        (2, 3, 4, 4),
    ),
    Pair(
        "BatchNorm3d",
        lambda: nn.LazyBatchNorm3d(track_running_stats=False),
        lambda: nn.BatchNorm3d(2, track_running_stats=False),
        (2, 2, 3, 2, 3),
    ),
    # torch's Lazy instance norms default to affine=True, track_running_stats=True,
    # the eager ones to False, False.
    Pair(
        "InstanceNorm1d",
        lambda: nn.LazyInstanceNorm1d(momentum=0.3),
        lambda: nn.InstanceNorm1d(3, momentum=0.3, affine=True, track_running_stats=True),
        (2, 3, 6),
    ),
    Pair(
        "InstanceNorm2d",
        lambda: nn.LazyInstanceNorm2d(eps=1e-3, track_running_stats=False),
        lambda: nn.InstanceNorm2d(4, eps=1e-3, affine=True),
        (2, 4, 3, 3),
    ),
    Pair(  # no tensors at all: torch's Lazy module would become InstanceNorm3d(0, ...)
        "InstanceNorm3d",
        lambda: nn.LazyInstanceNorm3d(affine=False, track_running_stats=False),
        lambda: nn.InstanceNorm3d(3),
        (1, 3, 2, 3, 2),
    ),
]


def test_every_lazy_class_has_a_pair_and_a_twin() -> None:
    assert {type(p.lazy()) for p in PAIRS} == set(LAZY_TWINS)
    assert len(LAZY_TWINS) == 13
    for lazy, twin in LAZY_TWINS.items():
        assert twin is getattr(dnn, lazy.cls_to_become.__name__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("pair", [pytest.param(p, id=p.id) for p in PAIRS])
def test_each_lazy_class_with_its_arguments_becomes_the_eager_class(
    pair: Pair, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(pair.shape)
    layer = pair.lazy()
    di.adopt(layer)
    assert type(layer) is LAZY_TWINS[type(pair.lazy())]
    torch.manual_seed(0)
    di.build(layer, x)
    torch.manual_seed(0)
    eager = pair.eager()
    assert type(layer) is type(eager)
    assert repr(layer) == repr(eager)
    assert_same_state(layer, eager)
    assert torch.equal(layer(x), eager(x))
    assert_same_state(layer, eager)  # running statistics too


def test_lazy_tensors_dtype_is_the_built_layers(assert_same_state: AssertSameState) -> None:
    x = torch.randn(2, 3, dtype=torch.float64)
    layer = nn.LazyLinear(4, dtype=torch.float64)
    di.adopt(layer)
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(0)
    assert_same_state(layer, nn.Linear(3, 4, dtype=torch.float64))


def test_lazy_tensors_on_meta_build_on_meta() -> None:
    layer = di.adopt(nn.LazyConv2d(4, 3, device="meta"))
    di.build(layer, (1, 2, 5, 5))
    assert type(layer) is nn.Conv2d and layer.weight.is_meta
    assert layer.weight.shape == (4, 2, 3, 3)


def kind(module: nn.Module) -> type[nn.Module]:
    """``type(module)``, which a build changes under mypy's feet."""
    return type(module)


# -- what adoption keeps --------------------------------------------------------------


def test_the_module_object_itself_is_kept_also_at_the_root() -> None:
    layer: nn.Module = nn.LazyLinear(3)
    weight = layer.weight
    net = nn.Sequential(layer)
    assert di.adopt(layer) is layer  # the root itself
    assert type(layer) is dnn.Linear and net[0] is layer
    assert layer.weight is weight
    net(torch.randn(2, 5))
    assert kind(layer) is nn.Linear and layer.weight is weight


def test_hooks_survive_and_torchs_own_lazy_hooks_go() -> None:
    calls: list[str] = []
    layer = nn.LazyLinear(3)
    pre = layer.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    layer.register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    di.adopt(layer)
    assert len(layer._forward_pre_hooks) == 1 and not layer._forward_pre_hooks_with_kwargs
    assert not layer._load_state_dict_pre_hooks
    assert "_initialize_hook" not in layer.__dict__
    layer(torch.randn(2, 4))
    layer(torch.randn(2, 4))
    assert calls == ["pre", "Linear", "pre", "Linear"]
    pre.remove()  # a handle taken before adoption still works
    layer(torch.randn(2, 4))
    assert calls[-2:] == ["Linear", "Linear"]


def test_train_and_eval_mode_are_kept() -> None:
    net = nn.Sequential(nn.LazyBatchNorm1d(), nn.LazyLinear(2)).eval()
    di.adopt(net)
    assert not net[0].training and not net[1].training
    x = torch.randn(4, 3)
    net(x)
    assert not net[0].training
    assert torch.equal(
        net.get_buffer("0.running_mean"), torch.zeros(3)
    )  # eval: statistics untouched


def test_requires_grad_set_before_adoption_is_kept() -> None:
    layer = nn.LazyLinear(3)
    layer.bias.requires_grad = False
    di.adopt(layer)
    di.build(layer, (2, 4))
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_adopted_model_copies_and_pickles_before_and_after_build(
    assert_same_state: AssertSameState,
) -> None:
    net = di.adopt(lenet(True))
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert type(copied.get_submodule("0")) is dnn.Conv2d
    di.build(net, (2, 1, 28, 28))
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert_same_state(copied, net)


def test_adopted_layers_reset_and_reinfer_with_the_same_parameter_objects() -> None:
    net = di.adopt(nn.Sequential(nn.LazyLinear(4), nn.LazyLinear(2)))
    before = list(net.parameters())
    net(torch.randn(2, 3))
    di.reset(net)
    assert di.pending(net) == ["0", "1"]
    net(torch.randn(2, 5))
    assert net[0].in_features == 5
    assert all(a is b for a, b in zip(net.parameters(), before, strict=True))


def test_registered_initializer_runs_at_the_adopted_layers_build() -> None:
    net = di.adopt(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2)))
    di.initialize(net, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    di.build(net, (2, 3))
    assert torch.equal(net.get_parameter("0.weight"), torch.ones(4, 3))
    assert torch.equal(net.get_parameter("2.bias"), torch.zeros(2))


# -- what adoption leaves alone or refuses ----------------------------------------------


def test_already_initialized_lazy_modules_are_left_alone() -> None:
    ran = nn.LazyLinear(3)
    ran(torch.randn(2, 4))  # now a plain nn.Linear
    loaded = nn.LazyLinear(3)  # sized by a checkpoint: still LazyLinear until its forward
    loaded.load_state_dict(nn.Linear(4, 3).state_dict())
    waiting: nn.Module = nn.LazyLinear(2)
    net = nn.Sequential(ran, loaded, waiting)
    weights = [m.weight for m in net]
    assert [name for name, _ in lazy_modules(net)] == ["2"]
    di.adopt(net)
    assert type(ran) is nn.Linear and type(loaded) is nn.LazyLinear
    assert type(waiting) is dnn.Linear
    assert [m.weight for m in net] == weights
    refuse_lazy(net, "di.build")  # nothing left waiting


def test_model_without_lazy_modules_is_returned_unchanged() -> None:
    net = nn.Sequential(nn.Linear(2, 3), dnn.Linear(4))
    layers = list(net)
    assert di.adopt(net) is net and list(net) == layers and type(net[1]) is dnn.Linear


class OwnLazyLinear(nn.LazyLinear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


def test_subclass_of_a_lazy_class_is_refused_and_nothing_changes() -> None:
    net = nn.Sequential(nn.LazyLinear(4), OwnLazyLinear(2))
    with pytest.raises(
        di.DeferredInitError,
        match=r"'1': OwnLazyLinear is a subclass of torch\.nn\.LazyLinear .*Nothing was changed",
    ):
        di.adopt(net)
    assert type(net[0]) is nn.LazyLinear and type(net[0].weight) is nn.UninitializedParameter
    assert len(net[0]._forward_pre_hooks) == 1


def test_partly_initialized_lazy_module_is_refused() -> None:
    layer = nn.LazyLinear(3)
    layer.load_state_dict({"weight": torch.zeros(3, 4)}, strict=False)
    with pytest.raises(di.DeferredInitError, match=r"holds values for weight but not"):
        di.adopt(nn.Sequential(layer))
    assert type(layer) is nn.LazyLinear


def test_interrupted_adoption_leaves_every_module_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = nn.Sequential(nn.LazyLinear(4), nn.LazyConv1d(2, 3), nn.LazyBatchNorm1d())
    classes = [type(m) for m in net]
    tensors = [(type(t), t) for t in net.parameters()]
    hooks = [list(m._forward_pre_hooks.items()) for m in net]
    commit = _Adoption.commit
    count = {"n": 0}

    def interrupted(self: _Adoption) -> None:
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt
        commit(self)

    monkeypatch.setattr(_Adoption, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        di.adopt(net)
    assert [type(m) for m in net] == classes
    assert [(type(t), t) for t in net.parameters()] == tensors
    assert [list(m._forward_pre_hooks.items()) for m in net] == hooks
    assert all("_di_owner" not in t.__dict__ for t in net.parameters())
    monkeypatch.undo()
    di.adopt(net)
    di.build(net, (2, 5, 6))
    assert di.is_built(net)


# -- the other entry points and Lazy modules ---------------------------------------------


def test_refuse_lazy_names_the_lazy_modules_and_the_fix() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(
        di.DeferredInitError,
        match=r"^di\.build: .*'0' \(LazyConv2d\), '2' \(LazyLinear\)\. Fix: call di\.adopt\(",
    ) as caught:
        refuse_lazy(net, "di.build")
    assert "\n" not in str(caught.value)
    refuse_lazy(di.adopt(net), "di.build")


def test_refuse_lazy_bounds_the_list_it_names() -> None:
    net = nn.Sequential(*[nn.LazyLinear(2) for _ in range(20)])
    with pytest.raises(di.DeferredInitError, match=r"and 14 more\. Fix"):
        refuse_lazy(net, "di.materialize")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda net: di.build(net, (2, 3)), id="build"),
        pytest.param(lambda net: di.materialize(net), id="materialize"),
        pytest.param(lambda net: di.initialize(net, lambda m: None), id="initialize"),
    ],
)
def test_entry_points_refuse_models_holding_lazy_modules(call: Callable[[nn.Module], Any]) -> None:
    layer = nn.LazyLinear(4)
    net = nn.Sequential(layer, nn.ReLU())
    with pytest.raises(di.DeferredInitError, match=r"'0' \(LazyLinear\).*call di\.adopt\(model\)"):
        call(net)
    assert type(layer.weight) is nn.UninitializedParameter and type(layer) is nn.LazyLinear


def test_summary_shows_lazy_modules_and_says_to_adopt_them() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2), nn.Linear(2, 2))
    for table in (di.summary(net), di.summary(net, (2, 1, 5, 5))):
        states = [row.state for row in table.rows]
        assert states == ["lazy (di.adopt)", "built", "lazy (di.adopt)", "built"]
        text = str(table)
        assert "torch.nn.Lazy* modules: 0, 2." in text and "call di.adopt(model)" in text
        assert table.to_dict()["rows"][0]["state"] == "lazy (di.adopt)"
    assert type(net[0].weight) is nn.UninitializedParameter  # the examples changed nothing
    rows = di.summary(di.adopt(net), (2, 1, 5, 5)).rows
    assert [row.state for row in rows] == ["deferred", "built", "deferred", "built"]
    assert rows[2].arguments == {"in_features": 36}
