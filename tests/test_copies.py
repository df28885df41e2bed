"""Copies and checkpoints (docs/design.md §3.7): ``copy.deepcopy`` and ``pickle`` in both
states, ``torch.save``/``torch.load(weights_only=True)`` of an unbuilt state dict,
and ``load_state_dict`` of an eager checkpoint into an unbuilt model."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Protocol, TypeVar

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
M = TypeVar("M", bound=nn.Module)


class Copier(Protocol):
    def __call__(self, module: M, /) -> M: ...


def pickled(module: M, /) -> M:
    copied: M = pickle.loads(pickle.dumps(module))
    return copied


COPIERS: list[Copier] = [copy.deepcopy, pickled]
COPIER_IDS = ["deepcopy", "pickle"]


def deferred_mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(4))


def deferred_convnet() -> nn.Sequential:
    return nn.Sequential(
        dnn.Conv2d(4, kernel_size=3),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.Flatten(),
        dnn.Linear(5),
        dnn.BatchNorm1d(),
    )


def eager_convnet(channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )


class Block(nn.Module):
    """A user's block, made deferrable with ``di.defer``."""

    def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x)) * self.scale


LazyBlock = di.defer(Block, in_dim=di.dim(-1))


# --- deepcopy and pickle --------------------------------------------------------------


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_unbuilt_copy_is_unbuilt_with_its_own_placeholders(copier: Copier) -> None:
    net = deferred_convnet()
    twin = copier(net)
    assert repr(twin) == repr(net)
    assert di.pending(twin) == di.pending(net) == ["0", "1", "4", "5"]
    assert list(twin.state_dict()) == list(net.state_dict())
    for theirs, ours in zip(twin.state_dict().values(), net.state_dict().values(), strict=True):
        assert isinstance(theirs, UninitializedParameter | UninitializedBuffer)
        assert theirs is not ours


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_unbuilt_copy_builds_independently_of_its_original(
    copier: Copier, assert_same_state: AssertSameState
) -> None:
    net = deferred_convnet()
    twin = copier(net)
    x_twin, x_net = torch.randn(2, 5, 6, 6), torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    twin_out = twin(x_twin)
    assert di.pending(net) == ["0", "1", "4", "5"]
    assert net[0].out_channels == 4
    torch.manual_seed(1)
    net_out = net(x_net)
    assert twin[0].in_channels == 5 and net[0].in_channels == 3
    torch.manual_seed(0)
    ref_twin = eager_convnet(channels=5)
    torch.manual_seed(1)
    ref_net = eager_convnet(channels=3)
    assert torch.equal(twin_out, ref_twin(x_twin))
    assert torch.equal(net_out, ref_net(x_net))
    assert_same_state(twin, ref_twin)
    assert_same_state(net, ref_net)


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_unbuilt_double_copy_builds_in_float64_as_eager(
    copier: Copier, assert_same_state: AssertSameState
) -> None:
    twin = copier(deferred_mlp().double())
    assert [p.dtype for p in twin.parameters()] == [torch.float64] * 4
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.manual_seed(0)
    out = twin(x)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    assert torch.equal(out, ref(x))
    assert_same_state(twin, ref)


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_unbuilt_batchnorm_copy_keeps_int64_num_batches_tracked(copier: Copier) -> None:
    twin = copier(nn.Sequential(dnn.BatchNorm1d()))
    assert twin.get_buffer("0.num_batches_tracked").dtype == torch.int64
    twin(torch.randn(4, 3))
    assert twin.get_buffer("0.num_batches_tracked").dtype == torch.int64
    assert int(twin.get_buffer("0.num_batches_tracked")) == 1


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_built_copy_equals_original_and_keeps_the_mismatch_check(
    copier: Copier, assert_same_state: AssertSameState
) -> None:
    net = deferred_convnet()
    x = torch.randn(2, 3, 6, 6)
    net(x)
    twin = copier(net)
    assert [type(m) for m in twin.modules()] == [type(m) for m in net.modules()]
    assert type(twin[0]) is nn.Conv2d
    assert repr(twin) == repr(net)
    assert_same_state(twin, net)
    net.eval()
    twin.eval()
    assert torch.equal(twin(x), net(x))
    with pytest.raises(
        di.ShapeMismatchError, match=r"(?s)Conv2d layer '0' was built for in_channels=3.*di\.reset"
    ):
        twin(torch.randn(2, 5, 6, 6))


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_built_copy_can_be_reset_and_rebuilt(copier: Copier) -> None:
    net = deferred_mlp()
    net(torch.randn(2, 3))
    twin = copier(net)
    di.reset(twin)
    assert twin(torch.randn(2, 6)).shape == (2, 4)
    assert twin[0].in_features == 6 and net[0].in_features == 3


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_copy_keeps_registered_initializer(copier: Copier) -> None:
    net = di.initialize(deferred_mlp(), {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    twin = copier(net)
    twin(torch.randn(2, 3))
    assert torch.equal(twin.get_parameter("0.weight"), torch.ones(8, 3))
    assert torch.equal(twin.get_parameter("2.bias"), torch.zeros(4))


@pytest.mark.parametrize("copier", COPIERS, ids=COPIER_IDS)
def test_deferred_user_class_copies_before_and_after_build(
    copier: Copier, assert_same_state: AssertSameState
) -> None:
    block: nn.Module = LazyBlock(out_dim=4, scale=2.0)
    twin = copier(block)
    assert type(twin) is type(block)
    assert repr(twin) == "Block(in_dim=?, out_dim=4, scale=2.0)"
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    out = twin(x)
    assert type(twin) is Block
    torch.manual_seed(0)
    ref = Block(3, 4, scale=2.0)
    assert torch.equal(out, ref(x))
    assert_same_state(twin, ref)
    again = copier(twin)
    assert type(again) is Block
    assert torch.equal(again(x), out)
    with pytest.raises(di.ShapeMismatchError, match=r"Block layer was built for in_dim=3"):
        again(torch.randn(2, 7))


def test_deferred_user_class_itself_pickles_by_recipe() -> None:
    cls = pickle.loads(pickle.dumps(LazyBlock))
    assert cls is LazyBlock
    block: nn.Module = cls(out_dim=2)
    block(torch.randn(1, 3))
    assert type(block) is Block


# --- torch.save / torch.load ----------------------------------------------------------


def test_unbuilt_state_dict_round_trips_through_weights_only_load() -> None:
    net = deferred_convnet()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert list(loaded) == list(net.state_dict())
    buffers = {name for name, _ in net.named_buffers()}
    for key, value in loaded.items():
        kind = UninitializedBuffer if key in buffers else UninitializedParameter
        assert isinstance(value, kind), key


# --- load_state_dict into an unbuilt model --------------------------------------------


def _eager_checkpoint(eager: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A trained-looking checkpoint: one training forward moves the running stats."""
    eager(x)
    buffer = io.BytesIO()
    torch.save(eager.state_dict(), buffer)
    buffer.seek(0)
    state: dict[str, torch.Tensor] = torch.load(buffer, weights_only=True)
    return state


@pytest.mark.parametrize(
    ("deferred", "eager", "shape"),
    [
        (deferred_mlp, lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)), (2, 3)),
        (deferred_convnet, lambda: eager_convnet(3), (2, 3, 6, 6)),
    ],
    ids=["mlp", "convnet"],
)
def test_load_eager_checkpoint_into_unbuilt_model_infers_every_size(
    deferred: Callable[[], nn.Module],
    eager: Callable[[], nn.Module],
    shape: tuple[int, ...],
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(*shape)
    ref = eager()
    state = _eager_checkpoint(ref, x)
    net = deferred()
    before = list(net.parameters())
    result = net.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert di.is_built(net)
    assert repr(net) == repr(ref)
    assert all(a is b for a, b in zip(net.parameters(), before, strict=True))
    assert_same_state(net, ref)
    net.eval()
    ref.eval()
    assert torch.equal(net(x), ref(x))


def test_load_checkpoint_into_partly_built_model() -> None:
    ref = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    net = deferred_mlp()
    net[0](torch.randn(1, 3))
    assert di.pending(net) == ["2"]
    net.load_state_dict(ref.state_dict())
    assert di.is_built(net)
    for got, want in zip(net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(got, want)


def _mlp_state() -> dict[str, torch.Tensor]:
    return dict(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4)).state_dict())


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    state = _mlp_state()
    state[key] = value
    return state


def _without(*keys: str) -> dict[str, torch.Tensor]:
    state = _mlp_state()
    for key in keys:
        del state[key]
    return state


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (lambda: _with("extra", torch.zeros(1)), r'Unexpected key\(s\) in state_dict: "extra"'),
        (lambda: _without("2.bias"), r'Missing key\(s\) in state_dict: "2\.bias"'),
        (
            lambda: _without("2.weight", "2.bias"),
            r'Missing key\(s\) in state_dict: "2\.weight", "2\.bias"',  # eager's order
        ),
        (
            lambda: _with("0.bias", torch.zeros(7)),
            r"size mismatch for 0\.bias: copying a param with shape torch\.Size\(\[7\]\)",
        ),
        (lambda: _with("2.weight", torch.zeros(5, 8)), r"size mismatch for 2\.weight"),
        (lambda: _with("0.weight", torch.zeros(24)), r"Linear layer at '0' is not built"),
    ],
    ids=[
        "unexpected",
        "missing-one",
        "missing-layer",
        "mis-shaped-bias",
        "mis-shaped-out",
        "mis-ranked",
    ],
)
def test_load_of_ill_fitting_checkpoint_into_unbuilt_model_raises(
    state: Callable[[], dict[str, torch.Tensor]], match: str
) -> None:
    net = deferred_mlp()
    with pytest.raises(RuntimeError, match=match):
        net.load_state_dict(state())


def test_non_strict_load_reports_missing_keys_and_leaves_their_layer_deferred() -> None:
    net = deferred_mlp()
    state = _without("2.weight", "2.bias")
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["2.bias", "2.weight"]
    assert result.unexpected_keys == []
    assert di.pending(net) == ["2"]
    assert torch.equal(net.get_parameter("0.weight"), state["0.weight"])
    assert net(torch.randn(2, 3)).shape == (2, 4)


def test_non_strict_load_reports_unexpected_keys() -> None:
    net = deferred_mlp()
    result = net.load_state_dict(_with("extra", torch.zeros(1)), strict=False)
    assert result.unexpected_keys == ["extra"]
    assert di.is_built(net)
