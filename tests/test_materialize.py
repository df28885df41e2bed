"""``di.materialize`` (docs/design.md §2, §3.3): allocate and initialize every meta tensor.

A model built with ``di.build(..., device="meta")`` — deferred layers and layers the
user declared under ``torch.device("meta")`` alike — gets memory and values, in
registration order, bitwise the eager model's under the same seed; parameter objects
keep their identity, so an optimizer made before still trains them. Registered
initializers apply; ``dtype=`` converts floating tensors; ``seed=`` gives each parameter
values that depend only on the seed and its qualified name; ``progress=`` shows a bar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill._dispatch import Fallback

AssertSameState = Callable[[nn.Module, nn.Module], None]
Factory = Callable[[], nn.Module]


# --- models: deferred on meta, and eager with the sizes written out -------------------


def deferred_mlp() -> nn.Module:
    return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))


def eager_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))


def deferred_lenet() -> nn.Module:
    return nn.Sequential(
        dnn.Conv2d(6, kernel_size=5, padding=2),
        dnn.BatchNorm2d(),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        dnn.Conv2d(16, kernel_size=5),
        dnn.BatchNorm2d(),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        dnn.Linear(120),
        dnn.BatchNorm1d(),
        nn.Sigmoid(),
        dnn.Linear(84),
        nn.Sigmoid(),
        dnn.Linear(10),
    )


def eager_lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.BatchNorm2d(6),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.BatchNorm2d(16),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.BatchNorm1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


class Attention(nn.Module):
    """Linear -> MultiheadAttention -> TransformerEncoderLayer -> Linear, batch first."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.embed: nn.Module
        self.attn: nn.Module
        self.encoder: nn.Module
        self.head: nn.Module
        if lazy:
            self.embed = dnn.Linear(16)
            self.attn = dnn.MultiheadAttention(num_heads=4, batch_first=True)
            self.encoder = dnn.TransformerEncoderLayer(
                nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
            )
            self.head = dnn.Linear(3)
        else:
            self.embed = nn.Linear(6, 16)
            self.attn = nn.MultiheadAttention(16, num_heads=4, batch_first=True)
            self.encoder = nn.TransformerEncoderLayer(
                16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
            )
            self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(self.encoder(h))  # type: ignore[no-any-return]


def deferred_attention() -> nn.Module:
    return Attention(lazy=True)


def eager_attention() -> nn.Module:
    return Attention(lazy=False)


CASES: dict[str, tuple[Factory, Factory, tuple[int, ...]]] = {
    "mlp": (deferred_mlp, eager_mlp, (2, 20)),
    "lenet-batchnorm": (deferred_lenet, eager_lenet, (2, 1, 28, 28)),
    "attention": (deferred_attention, eager_attention, (2, 5, 6)),
}


def on_meta(factory: Factory, shape: tuple[int, ...]) -> nn.Module:
    return di.build(factory(), torch.empty(shape, device="meta"), device="meta")


def all_meta(module: nn.Module) -> bool:
    return all(t.is_meta for t in [*module.parameters(), *module.buffers()])


def none_meta(module: nn.Module) -> bool:
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def tensor_objects(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


# --- bitwise the eager model ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_materialize_after_meta_build_equals_eager_bitwise(
    case: str, assert_same_state: AssertSameState
) -> None:
    deferred, eager, shape = CASES[case]
    model = on_meta(deferred, shape)
    assert all_meta(model)
    torch.manual_seed(0)
    assert di.materialize(model) is model
    after = torch.random.get_rng_state()
    torch.manual_seed(0)
    ref = eager()
    assert torch.equal(after, torch.random.get_rng_state())  # drew exactly what eager drew
    assert none_meta(model)
    assert repr(model) == repr(ref)
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert_same_state(model, ref)
    x = torch.randn(shape)
    assert torch.equal(model(x), ref(x))
    model.eval()
    ref.eval()
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("case", list(CASES))
def test_meta_build_then_materialize_equals_a_real_build(
    case: str, assert_same_state: AssertSameState
) -> None:
    deferred, _, shape = CASES[case]
    model = on_meta(deferred, shape)
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    real = di.build(deferred(), shape)
    assert_same_state(model, real)


def test_batchnorm_buffers_are_fresh_after_materialize() -> None:
    model = on_meta(deferred_lenet, (2, 1, 28, 28))
    di.materialize(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3
    for norm in norms:
        assert norm.running_mean is not None and norm.running_var is not None
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert norm.num_batches_tracked is not None
        assert norm.num_batches_tracked.dtype == torch.int64
        assert int(norm.num_batches_tracked) == 0


# --- identity: an optimizer made before materialize trains every parameter ----------------


def test_parameter_objects_keep_identity_and_optimizer_made_before_trains_them(
    assert_same_state: AssertSameState,
) -> None:
    x, target = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))

    def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

    model = deferred_lenet()
    before_build = tensor_objects(model)
    early = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # before build
    di.build(model, (2, 1, 28, 28), device="meta")
    before = tensor_objects(model)
    assert all(a is b for a, b in zip(before, before_build, strict=True))
    late = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # after build, on meta
    torch.manual_seed(0)
    di.materialize(model)
    after = tensor_objects(model)
    assert len(after) == len(before)
    assert all(a is b for a, b in zip(after, before, strict=True))
    assert [id(p) for p in late.param_groups[0]["params"]] == [id(p) for p in model.parameters()]

    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, early)
    torch.manual_seed(0)
    ref = eager_lenet()
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9))
    assert_same_state(model, ref)
    for name, param in model.named_parameters():
        assert not torch.equal(param, initial[name]), name


# --- layers declared under torch.device("meta") ----------------------------------------

# These tests declare layers on meta on purpose, to test something else; the warning
# di.materialize gives for them is pinned in test_unrecorded_init.py.
declared_on_meta = pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")


class MetaMixed(nn.Module):
    """An embedding and a linear layer declared on meta, mixed with deferred layers."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        with torch.device("meta" if lazy else "cpu"):
            self.embed = nn.Embedding(50, 8)
        self.mid = dnn.Linear(6) if lazy else nn.Linear(8, 6)
        self.norm = dnn.LayerNorm() if lazy else nn.LayerNorm(6)
        with torch.device("meta" if lazy else "cpu"):
            self.proj = nn.Linear(6, 4)
        self.head = dnn.Linear(3) if lazy else nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.mid(self.embed(tokens))))
        return self.head(self.proj(h))  # type: ignore[no-any-return]


TOKENS = torch.empty(2, 7, dtype=torch.long, device="meta")


def meta_mixed() -> nn.Module:
    return di.build(MetaMixed(lazy=True), TOKENS, device="meta")


def test_layers_declared_on_meta_materialize_with_deferred_ones(
    assert_same_state: AssertSameState,
) -> None:
    model = meta_mixed()
    assert all_meta(model)
    torch.manual_seed(0)
    with pytest.warns(
        di.UnrecordedInitWarning,
        match=r"di.materialize: embed \(Embedding\), proj \(Linear\): declared",
    ):
        di.materialize(model)  # names only the declared layers, not the deferred ones
    torch.manual_seed(0)
    ref = MetaMixed(lazy=False)
    assert none_meta(model)
    assert_same_state(model, ref)
    tokens = torch.randint(0, 50, (3, 5))
    assert torch.equal(model(tokens), ref(tokens))


def test_a_model_declared_entirely_on_meta_materializes_like_eager(
    assert_same_state: AssertSameState,
) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.LayerNorm(8))

    with torch.device("meta"):
        model = make()
    torch.manual_seed(0)
    with pytest.warns(
        di.UnrecordedInitWarning, match=r"0 \(Embedding\), 1 \(Linear\), 2 \(LayerNorm\)"
    ):
        di.materialize(model)  # like eager here: this model has no init code of its own
    assert_same_state(model, seeded(make))


def seeded(factory: Factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


# --- registered initializers --------------------------------------------------------------


def test_registered_mapping_initializer_is_applied_to_every_layer() -> None:
    model = MetaMixed(lazy=True)
    di.initialize(model, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    di.build(model, TOKENS, device="meta")
    di.materialize(model)
    for name, param in model.named_parameters():
        fill = 1.0 if name.endswith("weight") else 0.0
        assert torch.equal(param, torch.full_like(param, fill)), name


def test_registered_function_initializer_is_applied_to_every_layer() -> None:
    def init(module: nn.Module) -> None:
        if type(module) in (nn.Linear, nn.Embedding):
            nn.init.constant_(module.get_parameter("weight"), 0.5)
            if getattr(module, "bias", None) is not None:
                nn.init.constant_(module.get_parameter("bias"), -0.5)

    model = MetaMixed(lazy=True)
    di.initialize(model, init)
    di.build(model, TOKENS, device="meta")
    di.materialize(model)
    for name in ("embed", "mid", "proj", "head"):
        weight = model.get_parameter(f"{name}.weight")
        assert torch.equal(weight, torch.full_like(weight, 0.5)), name
    for name in ("mid", "proj", "head"):
        bias = model.get_parameter(f"{name}.bias")
        assert torch.equal(bias, torch.full_like(bias, -0.5)), name
    # The norm is not touched by init: it keeps its own reset values.
    assert torch.equal(model.get_parameter("norm.weight"), torch.ones(6))
    assert torch.equal(model.get_parameter("norm.bias"), torch.zeros(6))


@pytest.mark.parametrize("case", list(CASES))
def test_random_registered_initializer_gives_what_a_real_build_gives(
    case: str, assert_same_state: AssertSameState
) -> None:
    deferred, _, shape = CASES[case]
    init: dict[str, Callable[[torch.Tensor], Any]] = {"*.weight": nn.init.normal_}
    if case == "mlp":
        init = {"*": nn.init.normal_, "*.weight": nn.init.xavier_normal_}

    def make() -> nn.Module:
        return di.initialize(deferred(), init)

    model = di.build(make(), torch.empty(shape, device="meta"), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    real = di.build(make(), shape)
    assert none_meta(model)
    assert_same_state(model, real)


@declared_on_meta
def test_partial_mapping_leaves_meta_declared_layers_unmatched_parameters_at_reset() -> None:
    # docs/decisions.md: "Parameters that no pattern matches keep the values their layer's
    # own reset_parameters gave them." That holds for deferred layers; it must hold for
    # layers declared on meta too, never leaving uninitialized memory behind.
    # seed= makes each layer's values independent of the others', so the meta-declared
    # layer's own values are compared alone.
    plain = meta_mixed()
    di.materialize(plain, seed=0)
    model = MetaMixed(lazy=True)
    di.initialize(model, {"*.weight": nn.init.ones_})
    di.build(model, TOKENS, device="meta")
    di.materialize(model, seed=0)
    for name, param in model.named_parameters():
        if name.endswith("weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert torch.equal(param, plain.get_parameter(name)), name  # fails at proj.bias


def test_function_initializer_that_skips_a_meta_declared_layer_leaves_its_reset_values() -> None:
    def linear_only(module: nn.Module) -> None:
        if type(module) is nn.Linear:
            nn.init.zeros_(module.weight)

    model = MetaMixed(lazy=True)
    di.initialize(model, linear_only)
    di.build(model, TOKENS, device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    ref = MetaMixed(lazy=False)
    # The embedding is not a Linear: it must hold nn.Embedding's own N(0, 1) init.
    assert torch.equal(model.get_parameter("embed.weight"), ref.get_parameter("embed.weight"))
    assert torch.equal(model.get_parameter("proj.bias"), ref.get_parameter("proj.bias"))


# --- what cannot be materialized ------------------------------------------------------------


class NoReset(nn.Module):
    """A meta module with a parameter and no way to fill it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def with_no_reset() -> nn.Module:
    with torch.device("meta"):
        odd = NoReset()
    return di.build(nn.Sequential(dnn.Linear(4), odd, dnn.Linear(2)), (2, 3), device="meta")


def test_meta_module_without_reset_or_initializer_raises_and_allocates_nothing() -> None:
    model = with_no_reset()
    objects = tensor_objects(model)
    with pytest.raises(
        di.NotBuiltError,
        match=r"(?s)di\.materialize: 1 \(NoReset\).*no reset_parameters.*Nothing was "
        r"allocated.*Fix: .*di\.initialize",
    ):
        di.materialize(model)
    assert all_meta(model)
    assert all(a is b for a, b in zip(tensor_objects(model), objects, strict=True))


def test_meta_module_without_reset_materializes_once_it_has_an_initializer() -> None:
    model = with_no_reset()
    di.initialize(model.get_submodule("1"), {"scale": nn.init.ones_})
    di.materialize(model)
    assert none_meta(model)
    assert torch.equal(model.get_parameter("1.scale"), torch.ones(4))


def test_still_deferred_layers_raise_not_built_error_and_allocate_nothing() -> None:
    with torch.device("meta"):
        front = nn.Linear(3, 5)
    model = nn.Sequential(front, dnn.Linear(4), nn.Sequential(dnn.Linear(2)))
    with pytest.raises(
        di.NotBuiltError,
        match=r"(?s)layer\(s\) '1', '2\.0' are still deferred.*Nothing was allocated.*"
        r"Fix: .*di\.build\(model, example, device='meta'\)",
    ):
        di.materialize(model)
    assert front.weight.is_meta and front.bias.is_meta
    assert di.pending(model) == ["1", "2.0"]


# --- dtype ---------------------------------------------------------------------------------


def test_dtype_converts_floating_tensors_as_eager_to_would(
    assert_same_state: AssertSameState,
) -> None:
    model = on_meta(deferred_lenet, (2, 1, 28, 28))
    torch.manual_seed(0)
    di.materialize(model, dtype=torch.float64)
    ref = seeded(eager_lenet).to(torch.float64)
    assert_same_state(model, ref)
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert {v.dtype for k, v in state.items() if "num_batches" not in k} == {torch.float64}
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(model(x), ref(x))


@declared_on_meta
def test_dtype_applies_to_meta_declared_layers_too() -> None:
    model = meta_mixed()
    di.materialize(model, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- seed= -----------------------------------------------------------------------------------


class Named(nn.Module):
    """Shares the layer path ``enc.0`` with differently ordered, different siblings."""

    def __init__(self, variant: int) -> None:
        super().__init__()
        if variant == 0:
            self.first = dnn.Linear(7)
            self.enc = nn.Sequential(dnn.Linear(4), nn.ReLU())
        else:
            self.enc = nn.Sequential(dnn.Linear(4), nn.ReLU())
            self.other = dnn.Linear(9)
            self.last = dnn.Linear(2)
        with torch.device("meta"):
            self.extra = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.extra(x)]
        for name, child in self.named_children():
            if name != "extra":
                out.append(child(x))
        return out


def named(variant: int) -> nn.Module:
    return di.build(Named(variant), (2, 5), device="meta")


@declared_on_meta
def test_seed_values_depend_only_on_seed_and_qualified_name() -> None:
    a, b = named(0), named(1)
    torch.manual_seed(1)
    di.materialize(a, seed=42)
    torch.manual_seed(2)
    di.materialize(b, seed=42)
    for name in ("enc.0.weight", "enc.0.bias", "extra.weight", "extra.bias"):
        assert torch.equal(a.get_parameter(name), b.get_parameter(name)), name


@declared_on_meta
def test_seed_does_not_touch_the_global_random_state_and_different_seeds_differ() -> None:
    a, b = named(0), named(0)
    torch.manual_seed(5)
    rng = torch.random.get_rng_state()
    di.materialize(a, seed=42)
    assert torch.equal(rng, torch.random.get_rng_state())
    di.materialize(b, seed=43)
    assert not torch.equal(a.get_parameter("enc.0.weight"), b.get_parameter("enc.0.weight"))
    assert not torch.equal(a.get_parameter("first.weight"), a.get_parameter("enc.0.weight")[:, :1])


class TwoSquare(nn.Module):
    """Two same-shape layers, under names given by ``names``, after ``extra`` others."""

    def __init__(self, names: tuple[str, str], extra: int = 0) -> None:
        super().__init__()
        for i in range(extra):
            self.add_module(f"pad{i}", dnn.Linear(8))
        for name in names:
            self.add_module(name, dnn.Linear(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


def two_square_seeded(names: tuple[str, str], extra: int = 0) -> nn.Module:
    model = di.build(TwoSquare(names, extra), (2, 8), device="meta")
    return di.materialize(model, seed=0)


def test_seed_gives_same_shape_tensors_under_different_names_different_values() -> None:
    model = two_square_seeded(("a", "b"))
    assert not torch.equal(model.get_parameter("a.weight"), model.get_parameter("b.weight"))
    assert not torch.equal(model.get_parameter("a.bias"), model.get_parameter("b.bias"))
    # Within one layer too: Linear draws weight and bias from U(-1/sqrt(8), 1/sqrt(8)),
    # so one stream shared by both would make the bias the weight's first row.
    weight, bias = model.get_parameter("a.weight"), model.get_parameter("a.bias")
    assert not torch.equal(weight.flatten()[:8], bias)
    # The same layer (first of the two, same neighbours) under another name: other values.
    renamed = two_square_seeded(("c", "b"))
    assert not torch.equal(model.get_parameter("a.weight"), renamed.get_parameter("c.weight"))
    # The same name in another model, at another position among other neighbours: equal.
    elsewhere = two_square_seeded(("b", "a"), extra=2)
    for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
        assert torch.equal(model.get_parameter(name), elsewhere.get_parameter(name)), name


@pytest.mark.parametrize("alone", [False, True], ids=["one run", "tensor by tensor"])
def test_seed_runs_a_registered_initializer_only_where_its_values_are_used(
    alone: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            calls.append(module.weight.device.type)
            nn.init.normal_(module.weight)

    def model() -> nn.Module:
        built = di.build(nn.Sequential(dnn.Linear(4), dnn.Linear(3)), (2, 5), device="meta")
        with torch.device("meta"):
            built.append(nn.Linear(3, 2))  # declared on meta: the reset path
        di.initialize(built, init)
        return built

    want = di.materialize(model(), seed=0)
    assert calls == ["cpu"] * 3  # once per layer, never on a dry run
    if alone:  # each tensor initialized alone: once per tensor (weight, bias)
        monkeypatch.setattr("deferinit._fill._layers.seeded_whole", lambda *a, **k: None)
        monkeypatch.setattr("deferinit._fill._each.seeded_whole", lambda *a, **k: None)
        monkeypatch.setattr("deferinit._fill._each.once", _no_one_run)
        calls.clear()
        got = di.materialize(model(), seed=0)
        assert calls == ["cpu"] * 6
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_seed_gives_the_same_model_every_time(assert_same_state: AssertSameState) -> None:
    a, b = on_meta(deferred_attention, (2, 5, 6)), on_meta(deferred_attention, (2, 5, 6))
    torch.manual_seed(0)
    di.materialize(a, seed=7)
    torch.manual_seed(123)
    di.materialize(b, seed=7)
    assert_same_state(a, b)


# --- progress bar ------------------------------------------------------------------------------


def test_progress_true_writes_a_bar_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    model = on_meta(deferred_mlp, (2, 20))
    capsys.readouterr()
    di.materialize(model, progress=True)
    captured = capsys.readouterr()
    assert "materialize" in captured.err
    assert "100%" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("progress", [False, None], ids=["false", "default-small"])
def test_progress_false_or_default_on_a_small_model_writes_nothing(
    progress: bool | None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = on_meta(deferred_mlp, (2, 20))
    capsys.readouterr()
    di.materialize(model, progress=progress)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# --- arguments -----------------------------------------------------------------------------------


def test_meta_device_raises_and_allocates_nothing() -> None:
    model = on_meta(deferred_mlp, (2, 20))
    with pytest.raises(ValueError, match=r"device='meta' allocates nothing; pass a real device"):
        di.materialize(model, device="meta")
    with pytest.raises(ValueError, match=r"device='meta'"):
        di.materialize(model, device=torch.device("meta"))
    assert all_meta(model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_non_floating_dtype_raises(dtype: torch.dtype) -> None:
    model = on_meta(deferred_mlp, (2, 20))
    with pytest.raises(TypeError, match=rf"dtype must be a floating-point dtype, got {dtype}"):
        di.materialize(model, dtype=dtype)
    assert all_meta(model)


def test_non_module_raises() -> None:
    bad: Any = "model"
    with pytest.raises(TypeError, match=r"di\.materialize expects an nn\.Module, got str"):
        di.materialize(bad)


def test_materialize_twice_changes_nothing_and_a_real_model_is_left_alone() -> None:
    model = on_meta(deferred_mlp, (2, 20))
    di.materialize(model, device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    di.materialize(model)
    assert torch.equal(rng, torch.random.get_rng_state())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    real = eager_mlp()
    before = [p.detach().clone() for p in real.parameters()]
    di.materialize(real)
    assert all(torch.equal(a, b) for a, b in zip(real.parameters(), before, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_materialize_on_cuda_equals_eager_on_cuda(assert_same_state: AssertSameState) -> None:
    model = on_meta(deferred_attention, (2, 5, 6))
    torch.manual_seed(0)
    di.materialize(model, device="cuda")
    assert all(t.device.type == "cuda" for t in tensor_objects(model))
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = eager_attention()
    assert_same_state(model, ref)


# --- all or nothing ----------------------------------------------------------------------


class CausalMask(nn.Module):
    """A mask buffer computed in ``__init__``; ``reset_parameters`` sets the weight only."""

    mask: torch.Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, size))
        self.register_buffer("mask", torch.tril(torch.ones(size, size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight * self.mask)


class Failing(nn.Linear):
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            raise RuntimeError("initialization failed")


def declared(*modules: Callable[[], nn.Module]) -> nn.Sequential:
    with torch.device("meta"):
        return nn.Sequential(*(m() for m in modules))


def meta_state(model: nn.Module) -> list[tuple[str, int, str]]:
    return [
        (n, id(t), t.device.type) for n, t in [*model.named_parameters(), *model.named_buffers()]
    ]


@declared_on_meta
def test_a_meta_tensor_its_initialization_does_not_set_is_an_error_and_nothing_changes() -> None:
    model = declared(lambda: nn.Linear(4, 4), lambda: CausalMask(4))
    before = meta_state(model)
    with pytest.raises(di.NotBuiltError) as caught:
        di.materialize(model)
    message = str(caught.value)
    assert "'1' (CausalMask)" in message or "1 (CausalMask)" in message, message
    assert "'mask'" in message and "__init__" in message and "di.initialize" in message, message
    assert meta_state(model) == before  # the Linear filled first is back on meta

    def init(module: nn.Module) -> None:
        if isinstance(module, CausalMask):
            with torch.no_grad():
                module.mask.copy_(torch.tril(torch.ones_like(module.mask)))

    di.initialize(model[1], init)
    di.materialize(model)
    assert torch.equal(model[1].get_buffer("mask"), torch.tril(torch.ones(4, 4)))


@pytest.mark.parametrize("seed", [None, 0])
@declared_on_meta
def test_a_failing_initialization_leaves_every_tensor_on_meta_under_the_same_objects(
    seed: int | None,
) -> None:
    model = di.build(nn.Sequential(dnn.Linear(4), nn.ReLU()), (2, 3), device="meta")
    with torch.device("meta"):
        model.append(Failing(4, 2))
    before = meta_state(model)
    with pytest.raises(RuntimeError, match="initialization failed"):
        di.materialize(model, seed=seed)
    assert meta_state(model) == before
    torch.manual_seed(0)
    model[2] = nn.Linear(4, 2, device="meta")
    di.materialize(model)  # once fixed, it materializes
    assert all(t.device.type == "cpu" for t in model.parameters())


def test_undo_keeps_every_object_even_when_the_initializer_kept_a_view() -> None:
    model = di.build(nn.Sequential(dnn.Linear(4)), (2, 3), device="meta")
    kept: list[torch.Tensor] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            kept.append(module.weight.view(-1))  # blocks swapping the weight back
            raise ValueError("bad init")

    di.initialize(model, init)
    before = meta_state(model)
    with pytest.raises(ValueError, match="bad init"):
        di.materialize(model)
    assert meta_state(model) == before  # back on meta under the very same objects


# torch's own warning for Linear(0, 2), as in eager construction.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@declared_on_meta
def test_declared_empty_tensors_and_ties_inside_one_module_materialize() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.empty(3))
            self.b = self.a
            self.empty = nn.Linear(0, 2)

        def reset_parameters(self) -> None:
            nn.init.ones_(self.a)

    with torch.device("meta"):
        model = Twice()
    di.materialize(model)
    assert model.b is model.a
    assert torch.equal(model.a, torch.ones(3))
    assert model.empty.weight.shape == (2, 0) and model.empty.weight.device.type == "cpu"


def _no_one_run(*args: object, **kwargs: object) -> NoReturn:
    """Stands in for the one-run pass: forces the run per group of tensors."""
    raise Fallback("tensor by tensor")
