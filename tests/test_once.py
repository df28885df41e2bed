"""One run of a layer's initialization keeping only each tensor's wanted part
(``deferinit._fill._once``, what a rank's exact shards stand on): the kept parts are
bitwise the slices of one eager initialization, the generators end where it leaves
them, the layer is initialized once, and whatever the run cannot follow goes the
longer way with the same values."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from deferinit._fill import _each
from deferinit._fill._dispatch import named_tensors
from deferinit._fill._each import each_tensor
from deferinit._fill._once import Scratch

Make = Callable[[], nn.Module]
CPU = torch.device("cpu")


def with_init(make: Make, init: Callable[[torch.Tensor], object]) -> Make:
    def made() -> nn.Module:
        module = make()
        for p in module.parameters():
            if p.dim() > 1:
                init(p)
        return module

    return made


def trunc_normal(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.trunc_normal_(p, std=0.02)  # uniform_, erfinv_, mul_, add_, clamp_
    return module


LAYERS: dict[str, Make] = {
    "linear": lambda: nn.Linear(7, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "batchnorm": lambda: nn.BatchNorm2d(4),
    "embedding-padding": lambda: nn.Embedding(10, 4, padding_idx=3),
    "attention": lambda: nn.MultiheadAttention(8, 2),
    "attention-kdim-vdim": lambda: nn.MultiheadAttention(8, 2, kdim=3, vdim=5),
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True),
    "bilinear": lambda: nn.Bilinear(3, 4, 5),
    "encoder-layer": lambda: nn.TransformerEncoderLayer(8, 2, 16),
    "decoder-layer": lambda: nn.TransformerDecoderLayer(8, 2, 16),
    "adaptive-softmax": lambda: nn.AdaptiveLogSoftmaxWithLoss(16, 20, [5, 10]),
    "orthogonal": with_init(lambda: nn.Linear(6, 6), nn.init.orthogonal_),
    "xavier-normal": with_init(lambda: nn.GRUCell(4, 6), nn.init.xavier_normal_),
    "trunc-normal": lambda: trunc_normal(nn.Linear(6, 4)),
}


def half(name: str, full: torch.Tensor) -> torch.Tensor:
    """What a rank of two keeps along dim 0 (FSDP2's Shard(0)), as a copy."""
    if full.dim() == 0:
        return full.clone()
    return full[: -(-full.shape[0] // 2)].clone()


@pytest.fixture
def longer_way(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names that went the longer way (a run per group) instead of the one run."""
    seen: list[str] = []
    by_groups = _each._by_groups

    def spy(source: object, dry: Make, names: list[str], *rest: object) -> object:
        seen.extend(names)
        return by_groups(source, dry, names, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(_each, "_by_groups", spy)
    yield seen


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_one_run_keeps_the_slices_of_one_eager_initialization(
    make: Make, longer_way: list[str]
) -> None:
    torch.manual_seed(3)
    want = {n: half(n, t.detach()) for n, t in named_tensors(make()).items()}
    after = torch.get_rng_state()

    torch.manual_seed(3)
    got = dict(each_tensor(make, list(want), CPU, keep=half))
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(torch.get_rng_state(), after)
    assert longer_way == [], "torch's layers are followed in one run"


class Counted(nn.Linear):
    runs = 0

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self.weight.is_meta:
            type(self).runs += 1


def test_the_layer_is_initialized_once_for_all_its_tensors() -> None:
    Counted.runs = 0
    values = dict(each_tensor(lambda: Counted(64, 32), ["weight", "bias"], CPU, keep=half))
    assert Counted.runs == 1
    assert values["weight"].shape == (16, 64)


def test_kept_parts_own_their_memory_and_the_scratch_is_reused() -> None:
    scratch = Scratch()
    names = ["weight", "bias"]
    first = dict(each_tensor(lambda: nn.Linear(64, 32), names, CPU, keep=half, scratch=scratch))
    assert scratch.buffer is not None  # the largest tensor's bytes, free again
    lent = scratch.buffer.untyped_storage().data_ptr()
    second = dict(each_tensor(lambda: nn.Linear(64, 32), names, CPU, keep=half, scratch=scratch))
    assert scratch.buffer.untyped_storage().data_ptr() == lent
    for value in (*first.values(), *second.values()):
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


class CopiesWeight(nn.Module):
    """The bias is set from the weight after both were filled: a read of a tensor
    already set aside, which one run cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.bias.copy_(self.fc.weight[0])


class ScalesEarlier(nn.Module):
    """Writes part of a tensor after another one was filled."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        with torch.no_grad():
            self.a.weight[0].mul_(2.0)


class RefillsEarlier(nn.Module):
    """Fills a tensor set aside again, whole (as MultiheadAttention does with
    out_proj.bias): followed in one run."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 4)
        nn.init.normal_(self.a.weight)


@pytest.mark.parametrize(
    ("make", "longer"),
    [(CopiesWeight, True), (ScalesEarlier, True), (RefillsEarlier, False)],
    ids=["reads-a-tensor-set-aside", "writes-part-of-one-set-aside", "refills-one-whole"],
)
def test_what_one_run_cannot_follow_goes_the_longer_way_with_the_same_values(
    make: Make, longer: bool, longer_way: list[str]
) -> None:
    torch.manual_seed(0)
    want = {n: half(n, t.detach()) for n, t in named_tensors(make()).items()}
    after = torch.get_rng_state()
    torch.manual_seed(0)
    got = dict(each_tensor(make, list(want), CPU, keep=half))
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(torch.get_rng_state(), after)
    assert bool(longer_way) == longer


def test_seeded_one_run_keeps_the_slices_of_the_seeded_values() -> None:
    names = list(named_tensors(nn.TransformerEncoderLayer(8, 2, 16)))
    seeds = {name: 100 + i for i, name in enumerate(names)}.__getitem__

    def make() -> nn.Module:
        return nn.TransformerEncoderLayer(8, 2, 16)

    whole = dict(each_tensor(make, names, CPU, seeds))
    sliced = dict(each_tensor(make, names[::2], CPU, seeds, keep=half))  # a subset too
    for name, value in sliced.items():
        assert torch.equal(value, half(name, whole[name])), name
