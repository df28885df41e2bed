"""One tensor at a time (``deferinit._fill._each``), what sharded and seeded
materialization stand on: each tensor gets bitwise the value one whole
initialization of its layer gives it, the generator ends where that
initialization leaves it, and with seeds a tensor's value depends only on its
seed and its name."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill import _each
from deferinit._fill._dispatch import Fallback, named_tensors
from deferinit._fill._each import each_tensor
from deferinit._fill._streams import seeded_whole
from deferinit._random import draw

Make = Callable[[], nn.Module]
CPU = torch.device("cpu")

# Tests that declare modules on meta on purpose, to test something else; the warning
# di.materialize gives for them is pinned in test_unrecorded_init.py.
declared_on_meta = pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")


def with_init(make: Make, init: Callable[[torch.Tensor], object]) -> Make:
    def made() -> nn.Module:
        module = make()
        for p in module.parameters():
            if p.dim() > 1:
                init(p)
        return module

    return made


LAYERS: dict[str, Make] = {
    "linear": lambda: nn.Linear(7, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "batchnorm": lambda: nn.BatchNorm2d(4),
    "embedding-padding": lambda: nn.Embedding(10, 4, padding_idx=0),
    "attention-kdim-vdim": lambda: nn.MultiheadAttention(8, 2, kdim=3, vdim=5),
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True),
    "bilinear": lambda: nn.Bilinear(3, 4, 5),
    "encoder-layer": lambda: nn.TransformerEncoderLayer(8, 2, 16),
    "decoder-layer": lambda: nn.TransformerDecoderLayer(8, 2, 16),
    "adaptive-softmax": lambda: nn.AdaptiveLogSoftmaxWithLoss(16, 20, [5, 10]),
    "orthogonal": with_init(lambda: nn.Linear(6, 6), nn.init.orthogonal_),
    "xavier-normal": with_init(lambda: nn.GRUCell(4, 6), nn.init.xavier_normal_),
}


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names the mirror gave up on (initialized with a whole layer instead)."""
    seen: list[str] = []
    mirrored = _each._mirrored

    def spy(make: Make, names: list[str], *args: object, **kwargs: object) -> object:
        try:
            return mirrored(make, names, *args, **kwargs)  # type: ignore[arg-type]
        except Fallback:
            seen.extend(names)
            raise

    monkeypatch.setattr(_each, "_mirrored", spy)
    yield seen


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_each_tensor_equals_one_whole_initialization_and_leaves_the_generator_there(
    make: Make, fallbacks: list[str]
) -> None:
    torch.manual_seed(3)
    want = {n: t.detach().clone() for n, t in named_tensors(make()).items()}
    after = torch.get_rng_state()

    torch.manual_seed(3)
    got = {n: t.detach().clone() for n, t in each_tensor(make, list(want), CPU)}

    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(torch.get_rng_state(), after)
    assert fallbacks == [], "standard layers go one tensor at a time, without a whole layer"


def test_a_value_read_from_another_tensor_falls_back_to_the_whole_layer_same_values(
    fallbacks: list[str],
) -> None:
    def tied() -> nn.Module:  # bias copied from the weight: the mirror cannot follow it
        module = nn.Linear(4, 4)
        with torch.no_grad():
            module.bias.copy_(module.weight[0])
        return module

    torch.manual_seed(0)
    want = {n: t.detach().clone() for n, t in named_tensors(tied()).items()}
    after = torch.get_rng_state()
    torch.manual_seed(0)
    got = dict(each_tensor(tied, ["bias", "weight"], CPU))
    assert torch.equal(got["bias"], want["bias"])
    assert torch.equal(got["weight"], want["weight"])
    assert torch.equal(torch.get_rng_state(), after)
    assert "bias" in fallbacks


def test_a_subset_of_tensors_still_advances_the_generator_as_the_whole_layer() -> None:
    torch.manual_seed(0)
    nn.Linear(5, 3)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    (name, _), *_rest = each_tensor(lambda: nn.Linear(5, 3), ["bias"], CPU)
    assert name == "bias"
    assert torch.equal(torch.get_rng_state(), after)


def test_with_seeds_each_value_depends_only_on_its_seed_and_the_generator_is_left_alone() -> None:
    seeds = {"weight": 11, "bias": 12}.__getitem__
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = dict(each_tensor(lambda: nn.Linear(5, 3), ["weight", "bias"], CPU, seeds))
    assert torch.equal(torch.get_rng_state(), before)
    # Another parameter next to it (or none) changes nothing.
    b = dict(each_tensor(lambda: nn.Linear(5, 3, bias=False), ["weight"], CPU, seeds))
    assert torch.equal(a["weight"], b["weight"])
    c = dict(each_tensor(lambda: nn.Linear(5, 3), ["weight"], CPU, {"weight": 12}.__getitem__))
    assert not torch.equal(a["weight"], c["weight"])


# --- through di.materialize ---------------------------------------------------------------


class Pair(nn.Module):
    def __init__(self, deferred: bool, bias: bool) -> None:
        super().__init__()
        if deferred:
            self.proj: nn.Module = dnn.Linear(3, bias=bias)
        else:
            with torch.device("meta"):
                self.proj = nn.Linear(4, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # type: ignore[no-any-return]


@declared_on_meta
def test_seeded_values_do_not_depend_on_deferral_or_on_the_other_parameters() -> None:
    models = [
        di.build(Pair(deferred, bias), (2, 4), device="meta")
        for deferred, bias in [(True, True), (False, True), (True, False), (False, False)]
    ]
    for model in models:
        di.materialize(model, seed=5)
    weights = [m.get_parameter("proj.weight") for m in models]
    for weight in weights[1:]:
        assert torch.equal(weight, weights[0])
    assert torch.equal(models[0].get_parameter("proj.bias"), models[1].get_parameter("proj.bias"))


def test_seeded_attention_parameters_get_distinct_generators() -> None:
    model = di.build(dnn.MultiheadAttention(num_heads=2), (3, 8), (3, 8), (3, 8), device="meta")
    di.materialize(model, seed=0)
    q, k, v = model.in_proj_weight.detach().chunk(3)
    assert model.in_proj_weight.device.type == "cpu"
    assert not torch.equal(q, k) and not torch.equal(k, v)
    again = di.build(dnn.MultiheadAttention(num_heads=2), (3, 8), (3, 8), (3, 8), device="meta")
    di.materialize(again, seed=0)
    assert torch.equal(model.in_proj_weight, again.in_proj_weight)
    assert torch.equal(model.out_proj.weight, again.out_proj.weight)


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_seeded_in_one_run_equals_seeded_tensor_by_tensor(make: Make) -> None:
    names = list(named_tensors(make()))
    seeds = {name: 100 + i for i, name in enumerate(names)}.__getitem__
    alone = {n: t.detach().clone() for n, t in each_tensor(make, names, CPU, seeds)}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    whole = seeded_whole(make, CPU, seeds)
    assert torch.equal(torch.get_rng_state(), before)
    if make is LAYERS["orthogonal"]:
        assert whole is None  # orthogonal_ fills a scratch matrix: tensor by tensor
        return
    assert whole is not None
    for name, value in named_tensors(whole).items():
        assert torch.equal(value, alone[name]), name


# --- what initialization code may do ------------------------------------------------------


class Tied(nn.Module):
    """The head shares the embedding's weight: one tensor, registered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6)
        self.head.weight = self.emb.weight


class ReadsValue(nn.Module):
    """Fills one tensor from another's value, guarded by ``except Exception``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.gain = nn.Parameter(torch.empty(3))
        with torch.no_grad():
            try:
                self.gain.copy_(self.fc.bias.abs() * self.fc.weight.max().item())
            except Exception:  # noqa: BLE001 - what user code does; must not hide a fallback
                self.gain.fill_(1.0)


class PythonRandom(nn.Module):
    """Draws from Python's ``random`` and from torch's CPU generator explicitly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([random.gauss(0, 1) for _ in range(3)]))
        self.register_buffer("perm", torch.randperm(4, device="cpu"))


@pytest.mark.parametrize("make", [Tied, ReadsValue, PythonRandom])
def test_unusual_initialization_code_still_gets_eager_values_and_generator_states(
    make: Make,
) -> None:
    random.seed(1)
    torch.manual_seed(1)
    want = {n: t.detach().clone() for n, t in named_tensors(make()).items()}
    after_torch, after_python = torch.get_rng_state(), random.getstate()

    random.seed(1)
    torch.manual_seed(1)
    got = {n: t.detach().clone() for n, t in each_tensor(make, list(want), CPU)}
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(torch.get_rng_state(), after_torch)
    assert random.getstate() == after_python


def test_seeded_values_keep_the_relations_the_initialization_makes() -> None:
    got = dict(each_tensor(ReadsValue, ["fc.weight", "fc.bias", "gain"], CPU, lambda n: len(n)))
    want = got["fc.bias"].abs() * got["fc.weight"].max()
    assert torch.equal(got["gain"], want)


def test_seeded_materialize_leaves_every_generator_alone() -> None:
    model = di.build(nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2)), (2, 3), device="meta")
    torch.manual_seed(3)
    random.seed(3)
    before_torch, before_python = torch.get_rng_state(), random.getstate()
    di.materialize(model, seed=0)
    assert torch.equal(torch.get_rng_state(), before_torch)
    assert random.getstate() == before_python


def test_modules_made_by_another_thread_meanwhile_do_not_disturb_materialize() -> None:
    def model() -> nn.Module:
        return di.build(nn.Sequential(*(dnn.Linear(16) for _ in range(6))), (2, 8), device="meta")

    alone = di.materialize(model(), seed=0)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            nn.Linear(2, 2)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        together = [di.materialize(model(), seed=0) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    for other in together:
        pairs = zip(alone.state_dict().items(), other.state_dict().values(), strict=True)
        for (name, want), got in pairs:
            assert torch.equal(got, want), name


@contextlib.contextmanager
def _another_thread_drawing() -> Iterator[None]:
    """Another thread drawing from torch's default generator all the while."""
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(256)

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_seeded_tensor_by_tensor_ignores_random_draws_in_another_thread() -> None:
    seeds = {"weight": 1, "bias": 2, "": 3}.__getitem__
    cpu = torch.device("cpu")

    def make() -> nn.Module:
        return nn.Linear(64, 64)

    alone = dict(each_tensor(make, ["weight", "bias"], cpu, seeds))
    with _another_thread_drawing():
        for _ in range(20):
            got = dict(each_tensor(make, ["weight", "bias"], cpu, seeds))
            for name, want in alone.items():
                assert torch.equal(got[name], want), name


# --- modules declared on meta -------------------------------------------------------------


@declared_on_meta
def test_declared_module_materialized_as_float64_equals_eager_converted() -> None:
    torch.manual_seed(0)
    want = nn.Linear(5, 3).to(torch.float64)
    after = torch.get_rng_state()
    with torch.device("meta"):
        declared = nn.Linear(5, 3)
    torch.manual_seed(0)
    di.materialize(declared, dtype=torch.float64)
    assert torch.equal(declared.weight, want.weight)
    assert torch.equal(declared.bias, want.bias)
    assert torch.equal(torch.get_rng_state(), after)


@declared_on_meta
def test_declared_module_keeps_a_tensor_that_is_already_real() -> None:
    with torch.device("meta"):
        declared = nn.Linear(5, 3)
    loaded = torch.arange(15.0).reshape(3, 5)
    declared.load_state_dict({"weight": loaded.clone()}, strict=False, assign=True)
    di.materialize(declared)
    assert torch.equal(declared.weight, loaded)
    assert declared.bias.device.type == "cpu"


def test_weights_tied_inside_a_deferred_block_stay_tied_through_build_and_materialize() -> None:
    class Block(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.inp = nn.Linear(dim, dim)
            self.out = nn.Linear(dim, dim)
            self.out.weight = self.inp.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.inp(x)))  # type: ignore[no-any-return]

    deferred = di.defer(Block, dim=di.dim(-1))
    built = deferred()
    built(torch.randn(2, 6))
    assert built.out.weight is built.inp.weight
    on_meta = di.build(deferred(), (2, 6), device="meta")
    assert on_meta.out.weight is on_meta.inp.weight
    torch.manual_seed(0)
    di.materialize(on_meta)
    assert on_meta.out.weight is on_meta.inp.weight
    torch.manual_seed(0)
    eager = Block(6)
    for name, value in eager.state_dict().items():
        assert torch.equal(on_meta.state_dict()[name], value), name


def test_a_random_operator_without_a_generator_argument_still_draws_from_the_private_one() -> None:
    dropout = torch.ops.aten.native_dropout.default
    x = torch.ones(64)
    torch.manual_seed(0)
    want, _ = dropout(x, 0.5, True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mine = torch.Generator().manual_seed(0)
    first, _ = draw(mine, dropout, (x, 0.5, True), {})
    second, _ = draw(mine, dropout, (x, 0.5, True), {})
    assert torch.equal(first, want)
    assert not torch.equal(second, first)  # the private generator advanced
    assert torch.equal(torch.get_rng_state(), before)  # the default one is untouched


class _FailsForReal(nn.Linear):
    """Initialization code that raises ``KeyError`` on real tensors only (the dry
    runs on meta succeed), counting its real runs."""

    runs = 0

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self.weight.is_meta:
            type(self).runs += 1
            raise KeyError("missing from the user's table")


def test_an_error_from_initialization_code_is_raised_at_once_not_retried_whole() -> None:
    _FailsForReal.runs = 0
    with pytest.raises(KeyError, match="missing from the user's table"):
        dict(each_tensor(lambda: _FailsForReal(3, 2), ["weight", "bias"], CPU))
    assert _FailsForReal.runs == 1
