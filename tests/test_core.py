"""The core contract (docs/design.md §3.1–§3.4, §3.6): before build, build, equivalence with
eager torch, what carries over from the placeholder, tying, explicit sizes, the
mismatch check after build, ``di.reset`` and concurrent first calls.

Inputs are created before seeding: a deferred model draws its initial values at
its first forward, an eager one at construction, and both must draw the same.
"""

from __future__ import annotations

import copy as copy_module
import gc
import inspect
import pickle
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import deferinit as di
from deferinit import nn as dnn
from deferinit._declare import _deferred, _layout, _placeholder, _rules

AssertSameState = Callable[[nn.Module, nn.Module], None]


def deferred_mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))


def eager_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))


def deferred_lenet(batchnorm: bool) -> nn.Sequential:
    def norm(cls: type[nn.Module]) -> list[nn.Module]:
        return [cls()] if batchnorm else []

    return nn.Sequential(
        dnn.Conv2d(6, kernel_size=5, padding=2),
        *norm(dnn.BatchNorm2d),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        dnn.Conv2d(16, kernel_size=5),
        *norm(dnn.BatchNorm2d),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        dnn.Linear(120),
        *norm(dnn.BatchNorm1d),
        nn.Sigmoid(),
        dnn.Linear(84),
        *norm(dnn.BatchNorm1d),
        nn.Sigmoid(),
        dnn.Linear(10),
    )


def eager_lenet(batchnorm: bool) -> nn.Sequential:
    def norm(layer: nn.Module) -> list[nn.Module]:
        return [layer] if batchnorm else []

    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        *norm(nn.BatchNorm2d(6)),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        *norm(nn.BatchNorm2d(16)),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        *norm(nn.BatchNorm1d(120)),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        *norm(nn.BatchNorm1d(84)),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def built_pair(
    deferred: Callable[[], nn.Module], eager: Callable[[], nn.Module], x: torch.Tensor
) -> tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]:
    """Both models under seed 0, each run once on ``x``."""
    torch.manual_seed(0)
    lazy = deferred()
    lazy_out = lazy(x)
    torch.manual_seed(0)
    ref = eager()
    return lazy, lazy_out, ref, ref(x)


# --- before build (§3.1) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (lambda: dnn.Linear(256), "Linear(in_features=?, out_features=256, bias=True)"),
        (
            lambda: dnn.Conv2d(6, kernel_size=5, padding=2),
            "Conv2d(?, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))",
        ),
        (
            lambda: dnn.BatchNorm2d(),
            "BatchNorm2d(?, eps=1e-05, momentum=0.1, affine=True, bias=True, "
            "track_running_stats=True)",
        ),
    ],
)
def test_repr_before_build_shows_unknown_sizes_as_question_mark(
    layer: Callable[[], nn.Module], expected: str
) -> None:
    assert repr(layer()) == expected


def test_state_dict_before_build_lists_every_eager_key_as_placeholders() -> None:
    lazy = deferred_lenet(batchnorm=True)
    state = lazy.state_dict()
    assert list(state) == list(eager_lenet(batchnorm=True).state_dict())
    buffers = {name for name, _ in lazy.named_buffers()}
    assert len(buffers) == 3 * 4  # running_mean, running_var, num_batches_tracked per norm
    for key, value in state.items():
        kind = UninitializedBuffer if key in buffers else UninitializedParameter
        assert isinstance(value, kind), key


def test_is_built_and_pending_report_deferred_layers_by_qualified_name() -> None:
    encoder = nn.Sequential(dnn.Linear(8), nn.ReLU())
    net = nn.Sequential()
    net.add_module("encoder", encoder)
    net.add_module("head", dnn.Linear(2))
    assert not di.is_built(net)
    assert not di.is_built(encoder)
    assert di.is_built(encoder[1])
    assert di.pending(net) == ["encoder.0", "head"]
    assert di.pending(encoder) == ["0"]
    encoder(torch.randn(2, 3))
    assert di.pending(net) == ["head"]
    assert di.is_built(encoder)
    net(torch.randn(2, 3))
    assert di.is_built(net)
    assert di.pending(net) == []


def test_reading_an_inferred_size_before_build_raises_not_built_error() -> None:
    layer = dnn.Linear(4)
    assert layer.out_features == 4
    with pytest.raises(di.NotBuiltError, match=r"Linear layer: in_features is not known"):
        _ = layer.in_features
    assert not hasattr(layer, "in_features")


# --- build (§3.2) ---------------------------------------------------------------------


def test_build_keeps_identity_and_becomes_the_exact_torch_class() -> None:
    net = deferred_mlp()
    first, second = net[0], net[2]
    net(torch.randn(2, 20))
    assert net[0] is first and net[2] is second
    assert type(first) is nn.Linear and type(second) is nn.Linear
    assert first.in_features == 20 and second.in_features == 256


def test_repr_and_state_dict_keys_after_build_equal_eager() -> None:
    net, ref = deferred_lenet(batchnorm=True), eager_lenet(batchnorm=True)
    net(torch.randn(2, 1, 28, 28))
    assert repr(net) == repr(ref)
    assert list(net.state_dict()) == list(ref.state_dict())
    assert [type(m) for m in net.modules()] == [type(m) for m in ref.modules()]


def test_build_keeps_placeholder_parameter_objects() -> None:
    net = deferred_lenet(batchnorm=True)
    before = list(net.parameters())
    before_buffers = list(net.buffers())
    net(torch.randn(2, 1, 28, 28))
    after = list(net.parameters())
    assert len(after) == len(before)
    assert all(a is b for a, b in zip(after, before, strict=True))
    assert all(a is b for a, b in zip(net.buffers(), before_buffers, strict=True))
    assert all(type(p) is nn.Parameter for p in after)
    assert all(type(b) is torch.Tensor for b in net.buffers())


def test_optimizer_created_before_first_forward_trains_every_parameter(
    assert_same_state: AssertSameState,
) -> None:
    x, target = torch.randn(4, 20), torch.randn(4, 10)

    def train_step(model: nn.Module) -> nn.Module:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            optimizer.step()
        return model

    torch.manual_seed(0)
    lazy = train_step(deferred_mlp())
    torch.manual_seed(0)
    ref = train_step(eager_mlp())
    assert_same_state(lazy, ref)
    torch.manual_seed(0)
    untrained = eager_mlp()
    for trained, initial in zip(lazy.parameters(), untrained.parameters(), strict=True):
        assert not torch.equal(trained, initial)


def test_d2l_style_init_function_applies_after_build(
    assert_same_state: AssertSameState,
) -> None:
    def init_weights(m: nn.Module) -> None:
        if type(m) == nn.Linear:  # noqa: E721 - the d2l idiom this must support
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    x = torch.randn(2, 20)
    lazy, _, ref, _ = built_pair(deferred_mlp, eager_mlp, x)
    torch.manual_seed(1)
    lazy.apply(init_weights)
    torch.manual_seed(1)
    ref.apply(init_weights)
    assert_same_state(lazy, ref)
    assert torch.equal(lazy.get_parameter("2.bias"), torch.zeros(10))
    assert torch.equal(lazy(x), ref(x))


# --- equivalence (§3.3) ---------------------------------------------------------------


def test_mlp_equals_eager_bitwise(assert_same_state: AssertSameState) -> None:
    x = torch.randn(2, 20)
    lazy, lazy_out, ref, ref_out = built_pair(deferred_mlp, eager_mlp, x)
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_lenet_equals_eager_bitwise(batchnorm: bool, assert_same_state: AssertSameState) -> None:
    x, second = torch.randn(4, 1, 28, 28), torch.randn(3, 1, 28, 28)
    lazy, lazy_out, ref, ref_out = built_pair(
        lambda: deferred_lenet(batchnorm), lambda: eager_lenet(batchnorm), x
    )
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)  # running statistics included
    assert torch.equal(lazy(second), ref(second))
    lazy.eval()
    ref.eval()
    assert torch.equal(lazy(second), ref(second))
    assert_same_state(lazy, ref)


# --- what carries over from before the build (§3.2) ----------------------------------


@pytest.mark.parametrize(
    "convert",
    [lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to(dtype=torch.float64)],
    ids=["double", "to-dtype", "to-dtype-keyword"],
)
def test_double_before_build_equals_eager_constructed_then_doubled(
    convert: Callable[[nn.Module], nn.Module], assert_same_state: AssertSameState
) -> None:
    x = torch.randn(2, 20, dtype=torch.float64)
    lazy, lazy_out, ref, ref_out = built_pair(
        lambda: convert(deferred_mlp()), lambda: convert(eager_mlp()), x
    )
    assert lazy_out.dtype == torch.float64
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


def test_requires_grad_false_before_build_carries_over(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(2, 20)
    lazy, lazy_out, ref, ref_out = built_pair(
        lambda: deferred_mlp().requires_grad_(False),
        lambda: eager_mlp().requires_grad_(False),
        x,
    )
    assert [p.requires_grad for p in lazy.parameters()] == [False] * 4
    assert not lazy_out.requires_grad
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


def test_eval_before_build_carries_over_and_leaves_running_stats_untouched(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(4, 1, 28, 28)
    lazy, lazy_out, ref, ref_out = built_pair(
        lambda: deferred_lenet(batchnorm=True).eval(),
        lambda: eager_lenet(batchnorm=True).eval(),
        x,
    )
    assert not any(m.training for m in lazy.modules())
    norms = [m for m in lazy.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert len(norms) == 4
    for norm in norms:
        assert norm.running_mean is not None and norm.running_var is not None
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert norm.num_batches_tracked is not None and int(norm.num_batches_tracked) == 0
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


def test_train_after_eval_before_build_carries_over() -> None:
    net = deferred_lenet(batchnorm=True).eval().train()
    net(torch.randn(4, 1, 28, 28))
    assert all(m.training for m in net.modules())
    assert int(net.get_buffer("1.num_batches_tracked")) == 1


def test_hooks_registered_before_build_run_once_per_call() -> None:
    x = torch.randn(2, 20)
    calls: list[tuple[str, nn.Module]] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
        calls.append(("pre", module))
        return (args[0] * 2,)

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        calls.append(("post", module))
        return out + 1

    def hooked(layer: nn.Module) -> nn.Module:
        layer.register_forward_pre_hook(pre_hook)
        layer.register_forward_hook(hook)
        return layer

    torch.manual_seed(0)
    lazy = hooked(dnn.Linear(3))
    first = lazy(x)
    assert calls == [("pre", lazy), ("post", lazy)]
    second = lazy(x)
    assert calls == [("pre", lazy), ("post", lazy)] * 2
    torch.manual_seed(0)
    ref = hooked(nn.Linear(20, 3))
    assert torch.equal(first, ref(x))
    assert torch.equal(second, ref(x))


def test_pre_hook_output_is_what_the_layer_infers_from() -> None:
    layer = dnn.Linear(3)
    layer.register_forward_pre_hook(lambda m, args: (torch.cat([args[0], args[0]], dim=-1),))
    assert layer(torch.randn(2, 5)).shape == (2, 3)
    assert layer.in_features == 10


# --- tying (§3.2) ---------------------------------------------------------------------


def test_shared_deferred_layer_builds_at_first_use_and_is_shared(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(2, 20)

    def tied(layer: nn.Module) -> nn.Sequential:
        return nn.Sequential(layer, nn.ReLU(), layer)

    lazy, lazy_out, ref, ref_out = built_pair(
        lambda: tied(dnn.Linear(20)), lambda: tied(nn.Linear(20, 20)), x
    )
    assert isinstance(lazy, nn.Sequential)
    assert lazy[0] is lazy[2]
    assert type(lazy[0]) is nn.Linear
    assert len(list(lazy.parameters())) == 2
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


# --- explicit sizes (§2, §3.4) --------------------------------------------------------


def test_explicit_inferred_argument_builds_at_once(assert_same_state: AssertSameState) -> None:
    torch.manual_seed(0)
    layer: nn.Module = dnn.Linear(256, in_features=20)
    torch.manual_seed(0)
    ref = nn.Linear(20, 256)
    assert type(layer) is nn.Linear
    assert di.is_built(layer) and di.pending(layer) == []
    assert repr(layer) == repr(ref)
    assert_same_state(layer, ref)


def test_explicit_size_mismatch_raises_shape_mismatch_error() -> None:
    net = nn.Sequential(dnn.Linear(256, in_features=20))
    net(torch.randn(2, 20))
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"(?s)Linear layer '0'.*in_features=20.*\(2, 30\).*in_features=30.*Fix: ",
    ):
        net(torch.randn(2, 30))


@pytest.mark.parametrize(
    ("deferred", "eager", "shape"),
    [
        (lambda: dnn.Linear(4, bias=False), lambda: nn.Linear(3, 4, bias=False), (2, 3)),
        (lambda: dnn.Linear(4, bias=True), lambda: nn.Linear(3, 4, bias=True), (2, 3)),
        (
            lambda: dnn.Conv2d(4, 3, bias=False),
            lambda: nn.Conv2d(2, 4, 3, bias=False),
            (2, 2, 5, 5),
        ),
        (lambda: dnn.LayerNorm(bias=False), lambda: nn.LayerNorm(3, bias=False), (2, 3)),
    ],
    ids=["linear-no-bias", "linear-bias-keyword", "conv2d-no-bias", "layernorm-no-bias"],
)
def test_twin_takes_arguments_named_like_its_parameters(
    deferred: Callable[[], nn.Module],
    eager: Callable[[], nn.Module],
    shape: tuple[int, ...],
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(*shape)
    lazy, lazy_out, ref, ref_out = built_pair(deferred, eager, x)
    assert type(lazy) is type(ref)
    assert repr(lazy) == repr(ref)
    assert torch.equal(lazy_out, ref_out)
    assert_same_state(lazy, ref)


# --- after build (§3.4) ---------------------------------------------------------------


def test_batch_size_and_uninferred_dims_may_change_after_build() -> None:
    net = deferred_mlp()
    net(torch.randn(2, 20))
    assert net(torch.randn(7, 20)).shape == (7, 10)
    assert net(torch.randn(3, 5, 20)).shape == (3, 5, 10)
    conv = nn.Sequential(dnn.Conv2d(4, kernel_size=3), dnn.BatchNorm2d())
    conv(torch.randn(2, 3, 8, 8))
    assert conv(torch.randn(5, 3, 12, 6)).shape == (5, 4, 10, 4)


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(x)
        return out


@pytest.mark.parametrize(
    ("wrap", "name"),
    [
        (lambda layer: nn.Sequential(layer, nn.ReLU()), "0"),
        (lambda layer: nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), layer)), "1.1"),
        (lambda layer: _Encoder(nn.Sequential(layer, nn.ReLU())), "encoder.0"),
    ],
    ids=["top", "nested-sequential", "encoder"],
)
def test_inferred_dim_change_raises_shape_mismatch_naming_the_layer(
    wrap: Callable[[nn.Module], nn.Module], name: str
) -> None:
    layer: nn.Module = dnn.Linear(256)
    model = wrap(layer)
    model(torch.randn(2, 20))
    pattern = (
        rf"(?s)Linear layer '{re.escape(name)}' was built for in_features=20.*"
        r"float32 tensor of shape \(3, 30\).*in_features=30.*di\.reset"
    )
    with pytest.raises(di.ShapeMismatchError, match=pattern) as info:
        model(torch.randn(3, 30))
    assert isinstance(info.value, di.DeferredInitError)
    assert isinstance(info.value, RuntimeError)
    assert type(layer) is nn.Linear and layer.in_features == 20
    assert model(torch.randn(3, 20)).shape == (3, 256)


def test_conv_channel_change_raises_shape_mismatch() -> None:
    net = nn.Sequential(dnn.Conv2d(6, kernel_size=5, padding=2), nn.Sigmoid())
    net(torch.randn(2, 1, 28, 28))
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"(?s)Conv2d layer '0'.*in_channels=1.*\(2, 3, 28, 28\).*in_channels=3.*di\.reset",
    ):
        net(torch.randn(2, 3, 28, 28))


def test_reset_reinfers_sizes_and_keeps_initializers() -> None:
    net = deferred_mlp()
    di.initialize(net, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    net(torch.randn(2, 20))
    assert di.reset(net) is net
    assert di.pending(net) == ["0", "2"]
    assert repr(net[0]) == "Linear(in_features=?, out_features=256, bias=True)"
    out = net(torch.randn(2, 30))
    assert out.shape == (2, 10)
    assert net[0].in_features == 30
    assert torch.equal(net.get_parameter("0.weight"), torch.ones(256, 30))
    assert torch.equal(net.get_parameter("2.bias"), torch.zeros(10))


def test_reset_then_rebuild_equals_eager(assert_same_state: AssertSameState) -> None:
    x = torch.randn(2, 30)
    net = deferred_mlp()
    net(torch.randn(2, 20))
    di.reset(net)
    torch.manual_seed(0)
    out = net(x)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 10))
    assert torch.equal(out, ref(x))
    assert_same_state(net, ref)


def test_reset_keeps_parameter_objects_for_an_existing_optimizer() -> None:
    net = deferred_mlp()
    net(torch.randn(2, 20))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    di.reset(net)
    net(torch.randn(2, 30)).sum().backward()
    optimizer.step()
    held = optimizer.param_groups[0]["params"]
    assert all(a is b for a, b in zip(held, net.parameters(), strict=True))
    assert held[0].shape == (256, 30)


# --- threads (§3.6) -------------------------------------------------------------------


_CONSTRUCTED: list[int] = []


class CountingBlock(nn.Module):
    """Counts real constructions (``di.defer`` probes on meta; those are not counted)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if not torch.empty(0).is_meta:
            _CONSTRUCTED.append(out_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


LazyCountingBlock = di.defer(CountingBlock, in_dim=di.dim(-1))


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_first_calls_build_each_layer_once(
    attempt: int, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(4, 5)
    torch.manual_seed(attempt)
    net = nn.Sequential(LazyCountingBlock(out_dim=16), dnn.Linear(8), LazyCountingBlock(3))
    placeholders = list(net.parameters())
    _CONSTRUCTED.clear()
    barrier = threading.Barrier(8)
    outputs: list[torch.Tensor | None] = [None] * 8
    errors: list[BaseException] = []

    def first_call(i: int) -> None:
        barrier.wait()
        try:
            outputs[i] = net(x)
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(_CONSTRUCTED) == [3, 16]
    assert all(a is b for a, b in zip(net.parameters(), placeholders, strict=True))
    assert di.is_built(net)
    torch.manual_seed(attempt)
    ref = nn.Sequential(CountingBlock(5, 16), nn.Linear(16, 8), CountingBlock(8, 3))
    assert_same_state(net, ref)
    expected = ref(x)
    assert all(out is not None and torch.equal(out, expected) for out in outputs)


# --- pickling with a lambda rule, bounded caches (§3.7, issue 8) ------------------------


class PairBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # type: ignore[no-any-return]


def test_layer_deferred_with_a_lambda_rule_pickles_once_built() -> None:
    block = di.defer(PairBlock, in_dim=lambda x: x.shape[-1])(out_dim=3)
    x = torch.randn(2, 4)
    out = block(x)
    copy = pickle.loads(pickle.dumps(block))
    assert type(copy) is PairBlock
    assert torch.equal(copy(x), out)
    di.reset(copy)  # the rule did not travel: inferring again says so
    with pytest.raises(
        di.InferenceError, match=r"(?s)PairBlock layer cannot infer in_dim.*not pickled.*di\.dim"
    ):
        copy(torch.randn(2, 5))


def test_unbuilt_layer_with_a_lambda_rule_refuses_pickle_naming_the_rule_and_the_fix() -> None:
    block = di.defer(PairBlock, in_dim=lambda x: x.shape[-1])(out_dim=3)
    with pytest.raises(
        di.NotBuiltError,
        match=r"PairBlock layer: cannot be pickled before it is built: .*in_dim \(rule "
        r"<lambda>\).*Fix: build the layer first .*di\.dim",
    ) as caught:
        pickle.dumps(block)
    assert isinstance(caught.value, pickle.PicklingError)
    twin = copy_module.deepcopy(block)  # deepcopy keeps the class itself
    assert twin(torch.randn(2, 4)).shape == (2, 3)


def test_layout_cache_stays_bounded_over_many_distinct_sizes() -> None:
    for size in range(1, 2 * _layout.LAYOUT_CACHE_SIZE):
        dnn.Linear(size)
    assert len(_layout._LAYOUTS) <= _layout.LAYOUT_CACHE_SIZE


def test_deferred_classes_with_new_lambda_rules_are_not_kept_for_good() -> None:
    refs = []
    for _ in range(_layout.LAYOUT_CACHE_SIZE + 50):
        cls = di.defer(PairBlock, in_dim=lambda x: x.shape[-1])
        cls(out_dim=2)
        refs.append(weakref.ref(cls))
    del cls
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive <= _layout.LAYOUT_CACHE_SIZE  # only what the layout cache still holds
    assert refs[0]() is None


def test_same_rule_function_gives_the_same_deferred_class() -> None:
    def rule(x: torch.Tensor) -> int:
        return int(x.shape[-1])

    assert di.defer(PairBlock, in_dim=rule) is di.defer(PairBlock, in_dim=rule)


def test_materialize_names_a_failing_layer_by_its_full_qualified_name() -> None:
    model = nn.Sequential(nn.Sequential(nn.ReLU(), dnn.Linear(4)))

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            raise ValueError("no")

    di.initialize(model.get_submodule("0.1"), init)
    di.build(model, (2, 3), device="meta")
    with pytest.raises(di.InferenceError, match=r"^Linear layer '0\.1': the initializer"):
        di.materialize(model)


def test_a_deferred_class_shows_the_signature_of_the_real_one_minus_the_inferred_arguments() -> (
    None
):
    lazy = di.defer(PairBlock, in_dim=lambda x: x.shape[-1])
    real = inspect.signature(PairBlock)
    kept = [p for p in real.parameters.values() if p.name != "in_dim"]
    want = real.replace(parameters=kept)
    assert inspect.signature(lazy) == want


def test_an_inference_error_says_which_argument_the_size_is_read_from() -> None:
    with pytest.raises(
        di.InferenceError, match=r"cannot infer in_features \(from input\.shape\[-1\]\)"
    ):
        dnn.Linear(4)(torch.tensor(1.0))


def test_a_multi_tensor_placeholder_holds_its_submodule_placeholders_in_holders() -> None:
    layer = dnn.MultiheadAttention(num_heads=2)
    holder = layer.get_submodule("out_proj")
    assert type(holder) is _placeholder.Holder
    names = [name for name, _ in _placeholder.placeholder_tensors(layer)]
    assert names == list(layer.state_dict())
    layout = layer._di.layout
    assert layout is not None and isinstance(layout.tensors[0], _layout.TensorSpec)


def test_the_layout_of_a_declaration_is_cached_by_its_arguments() -> None:
    first, second = dnn.Linear(7), dnn.Linear(7)
    assert first._di.layout is second._di.layout
    assert _layout.layout_of(dnn.Linear, first._di) is first._di.layout


def test_names_nothing_calls_are_gone() -> None:
    assert not hasattr(_deferred, "is_deferred")
    assert not hasattr(_rules.Call, "shapes")
    assert "start" not in inspect.signature(_layout.probe_layout).parameters
