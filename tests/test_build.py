"""``di.build`` (docs/design.md §2, §3.3, §3.5, §3.8): a shape-only pass builds every deferred
layer, in registration order, with no arithmetic on data and no activation memory.

Examples may be tensors, shapes (tuples of ints, ``torch.Size``), meta or fake
tensors, positional or by keyword. The built model equals the eager one bitwise
under the same seed, even when its forward runs layers in another order than they
were registered; the random state afterwards is what eager construction leaves.
``device="meta"`` allocates nothing. A build is all-or-nothing, and layers the
examples never reach are reported by name instead of being left uninitialized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def deferred_mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))


def eager_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))


def deferred_convnet() -> nn.Sequential:
    return nn.Sequential(
        dnn.Conv2d(6, kernel_size=5, padding=2),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        dnn.Conv2d(16, kernel_size=5),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.Flatten(),
        dnn.Linear(32),
        dnn.BatchNorm1d(),
        nn.ReLU(),
        dnn.Linear(10),
    )


def eager_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def placeholders(module: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Every (module, name, tensor object) below ``module``, to check identity later."""
    return [
        (sub, name, tensor)
        for sub in module.modules()
        for table in (sub._parameters, sub._buffers)
        for name, tensor in table.items()
    ]


def assert_untouched(module: nn.Module, before: list[tuple[nn.Module, str, Any]]) -> None:
    """The same tensor objects sit under the same names as before."""
    for sub, name, tensor in before:
        current = sub._parameters[name] if name in sub._parameters else sub._buffers[name]
        assert current is tensor, name


# --- examples: tensors, shapes, meta and fake tensors, keywords ---------------------


@pytest.mark.parametrize(
    "example",
    [
        lambda: torch.randn(2, 20),
        lambda: (2, 20),
        lambda: torch.Size([2, 20]),
        lambda: torch.empty(2, 20, device="meta"),
        lambda: torch.empty(7, 20).t().t(),
    ],
    ids=["tensor", "tuple", "torch.Size", "meta-tensor", "strided-tensor"],
)
def test_build_from_any_kind_of_example_equals_eager_bitwise(
    example: Callable[[], Any], assert_same_state: AssertSameState
) -> None:
    given = example()
    x = torch.randn(5, 20)
    torch.manual_seed(0)
    net = deferred_mlp()
    assert di.build(net, given) is net
    ref = seeded(eager_mlp)
    assert di.is_built(net) and di.pending(net) == []
    assert type(net[0]) is nn.Linear and type(net[2]) is nn.Linear
    assert repr(net) == repr(ref)
    assert_same_state(net, ref)
    assert torch.equal(net(x), ref(x))


def test_build_from_a_fake_tensor_made_under_the_users_own_fake_mode(
    assert_same_state: AssertSameState,
) -> None:
    with FakeTensorMode():
        fake = torch.empty(3, 20)
    torch.manual_seed(0)
    net = di.build(deferred_mlp(), fake)
    assert_same_state(net, seeded(eager_mlp))
    assert all(type(p) is nn.Parameter for p in net.parameters())


def test_build_from_meta_token_ids_through_an_embedding_front(
    assert_same_state: AssertSameState,
) -> None:
    tokens = torch.empty(2, 7, dtype=torch.long, device="meta")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(100, 16), dnn.LayerNorm(), dnn.Linear(8))
    di.build(net, tokens)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Embedding(100, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    assert repr(net) == repr(ref)
    assert_same_state(net, ref)
    assert all(p.device.type == "cpu" for p in net.parameters())
    ids = torch.randint(0, 100, (3, 5))
    assert torch.equal(net(ids), ref(ids))


class TwoInputs(nn.Module):
    """forward(x, *, context): the second input only by keyword."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.query = dnn.Linear(8) if lazy else nn.Linear(4, 8)
        self.context = dnn.Linear(8) if lazy else nn.Linear(6, 8)
        self.mix = dnn.Bilinear(3) if lazy else nn.Bilinear(8, 8, 3)

    def forward(self, x: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        return self.mix(self.query(x), self.context(context).mean(dim=1))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (((2, 4),), {"context": (2, 5, 6)}),
        ((), {"x": torch.Size([2, 4]), "context": torch.empty(2, 5, 6, device="meta")}),
        ((torch.randn(2, 4),), {"context": torch.randn(2, 5, 6)}),
    ],
    ids=["shape-and-keyword", "all-keywords", "tensors"],
)
def test_build_with_keyword_examples(
    args: tuple[Any, ...], kwargs: dict[str, Any], assert_same_state: AssertSameState
) -> None:
    torch.manual_seed(0)
    model = di.build(TwoInputs(lazy=True), *args, **kwargs)
    ref = seeded(lambda: TwoInputs(lazy=False))
    assert repr(model) == repr(ref)
    assert_same_state(model, ref)
    x, context = torch.randn(3, 4), torch.randn(3, 2, 6)
    assert torch.equal(model(x, context=context), ref(x, context=context))


def test_build_of_a_convnet_from_a_shape_equals_eager_and_keeps_running_stats(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    net = di.build(deferred_convnet(), (4, 1, 16, 16))
    ref = seeded(eager_convnet)
    assert repr(net) == repr(ref)
    assert_same_state(net, ref)  # running_mean/var and num_batches_tracked included: untouched
    for norm in [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        assert norm.num_batches_tracked is not None and int(norm.num_batches_tracked) == 0
    assert all(m.training for m in net.modules())
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(net(x), ref(x))
    assert_same_state(net, ref)  # and the first real training-mode pass updates both alike


def test_shape_only_pass_uses_no_activation_memory() -> None:
    # 2**20 x 2**16 float32 activations would take 256 GiB: only shapes may flow.
    huge = (2**20, 2**16)
    net = di.build(nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2)), huge)
    assert net[0].in_features == 2**16 and net[2].in_features == 4
    meta_huge = torch.empty(2**20, 2**16, device="meta")
    other = di.build(nn.Sequential(dnn.LayerNorm(), dnn.Linear(3)), meta_huge)
    assert other[0].normalized_shape == (2**16,)


class MakesConstants(nn.Module):
    """A forward that creates tensors on the default device, as eager code often does
    (``torch.arange(length)`` positions, a ``torch.ones`` offset)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = dnn.Linear(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[-2], dtype=x.dtype).unsqueeze(-1)
        return self.proj(x + positions + torch.ones(x.shape[-1]))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "example",
    [lambda: (2, 3, 5), lambda: torch.randn(2, 3, 5), lambda: torch.empty(2, 3, 5, device="meta")],
    ids=["shape", "tensor", "meta-tensor"],
)
def test_forward_creating_default_device_tensors_builds(example: Callable[[], Any]) -> None:
    # Works when called on real data, so it must build from a shape of that data.
    given = example()
    model = MakesConstants()
    model(torch.randn(2, 3, 5))  # an implicit build works ...
    di.reset(model)
    di.build(model, given)  # ... and so must di.build
    assert di.is_built(model) and model.proj.in_features == 5
    assert model.proj.weight.device.type == "cpu"


# --- no arithmetic: built layers with real weights take part untouched ---------------


def test_real_weight_layers_are_untouched_and_mix_with_deferred_ones() -> None:
    torch.manual_seed(0)
    real_front = nn.Linear(20, 16)
    real_norm = nn.LayerNorm(8)
    net = nn.Sequential(real_front, nn.ReLU(), dnn.Linear(8), real_norm, dnn.Linear(3))
    real = ("0.weight", "0.bias", "3.weight", "3.bias")
    before = {k: net.state_dict()[k].clone() for k in real}
    pointers = {k: net.state_dict()[k].data_ptr() for k in real}
    objects = placeholders(net)
    versions = {id(t): t._version for sub, _, t in objects if sub in (real_front, real_norm)}

    di.build(net, torch.randn(4, 20))

    assert net[2].in_features == 16 and net[4].in_features == 8
    for key in real:
        assert torch.equal(net.state_dict()[key], before[key]), key
        assert net.state_dict()[key].data_ptr() == pointers[key], key
    assert_untouched(net, objects)  # placeholders became the parameters, in place
    for _, name, tensor in objects:
        if id(tensor) in versions:
            assert tensor._version == versions[id(tensor)], name  # no in-place write at all


@pytest.mark.parametrize("where", ["before", "after"], ids=["before-deferred", "after-deferred"])
def test_build_leaves_a_real_batchnorm_statistics_unchanged(where: str) -> None:
    # A shape-only pass must not be a training-mode pass (docs/design.md §4.9).
    norm = nn.BatchNorm1d(8)
    with torch.no_grad():
        assert norm.running_mean is not None and norm.running_var is not None
        norm.running_mean.fill_(0.5)
        norm.running_var.fill_(2.0)
    norm.num_batches_tracked = torch.tensor(7)
    layers = [norm, dnn.Linear(3)] if where == "before" else [dnn.Linear(8), norm]
    net = nn.Sequential(*layers)
    stats = {k: v.clone() for k, v in norm.state_dict().items()}
    versions = {k: v._version for k, v in norm.state_dict().items()}

    di.build(net, (4, 8))

    assert norm.training
    for key, value in norm.state_dict().items():
        assert torch.equal(value, stats[key]), key
        assert value._version == versions[key], key
    assert int(net.get_buffer(f"{layers.index(norm)}.num_batches_tracked")) == 7


def test_mixed_model_equals_eager_bitwise(assert_same_state: AssertSameState) -> None:
    def mixed() -> nn.Sequential:
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), dnn.Linear(8), dnn.BatchNorm1d())

    def eager() -> nn.Sequential:
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8))

    torch.manual_seed(0)
    net = di.build(mixed(), (5, 20))
    ref = seeded(eager)
    assert_same_state(net, ref)
    x = torch.randn(5, 20)
    assert torch.equal(net(x), ref(x))


# --- registration order, not execution order ----------------------------------------


class Reversed(nn.Module):
    """Registers ``b`` before ``a`` but runs ``a`` then ``b``."""

    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.b = dnn.Linear(4) if lazy else nn.Linear(8, 4)
        self.a = dnn.Linear(8) if lazy else nn.Linear(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))  # type: ignore[no-any-return]


def test_build_initializes_in_registration_order_like_eager(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(3, 5)
    torch.manual_seed(0)
    built = di.build(Reversed(lazy=True), (2, 5))
    after_build = torch.random.get_rng_state()
    torch.manual_seed(0)
    ref = Reversed(lazy=False)
    assert torch.equal(after_build, torch.random.get_rng_state())
    assert_same_state(built, ref)
    assert torch.equal(built(x), ref(x))

    # An implicit first forward builds in execution order: a's values come first.
    torch.manual_seed(0)
    implicit = Reversed(lazy=True)
    implicit(x)
    assert not torch.equal(implicit.a.weight, ref.a.weight)
    assert not torch.equal(implicit.b.weight, ref.b.weight)


@pytest.mark.parametrize(
    "example", [lambda: torch.randn(4, 1, 16, 16), lambda: (4, 1, 16, 16)], ids=["tensor", "shape"]
)
def test_random_state_after_build_equals_eager_construction(example: Callable[[], Any]) -> None:
    given = example()
    torch.manual_seed(3)
    di.build(deferred_convnet(), given)
    after_build = torch.random.get_rng_state()
    torch.manual_seed(3)
    eager_convnet()
    assert torch.equal(after_build, torch.random.get_rng_state())


# --- device="meta" --------------------------------------------------------------------


def test_build_on_meta_allocates_no_parameter() -> None:
    net = deferred_convnet()
    torch.manual_seed(0)
    rng = torch.random.get_rng_state()
    di.build(net, (4, 1, 16, 16), device="meta")
    assert di.is_built(net)
    tensors = [*net.parameters(), *net.buffers()]
    assert len(tensors) == 4 * 2 + 3 * 5  # weights/biases, affine + three stats per norm
    assert all(t.device.type == "meta" for t in tensors)
    assert all(type(p) is nn.Parameter for p in net.parameters())
    assert torch.equal(rng, torch.random.get_rng_state())  # nothing drawn on meta
    assert repr(net) == repr(eager_convnet())


def test_build_on_meta_sizes_a_model_far_larger_than_memory() -> None:
    # 4 x 100_000 x 100_000 float32 parameters: 160 GB if anything were allocated.
    blocks = [dnn.Linear(100_000, bias=False) for _ in range(4)]
    net = di.build(nn.Sequential(*blocks), (1, 100_000), device="meta")
    assert sum(p.numel() for p in net.parameters()) == 4 * 10**10
    assert all(p.is_meta for p in net.parameters())


def test_build_of_a_model_declared_on_meta_keeps_it_on_meta() -> None:
    with torch.device("meta"):
        embedding = nn.Embedding(1000, 32)
    net = nn.Sequential(embedding, dnn.Linear(64), nn.GELU(), dnn.Linear(32))
    di.build(net, torch.empty(2, 9, dtype=torch.long, device="meta"), device="meta")
    assert net[1].in_features == 32 and net[3].in_features == 64
    assert all(p.is_meta for p in net.parameters())


# --- all-or-nothing (§3.5) ------------------------------------------------------------


def test_wrong_rank_example_leaves_every_layer_deferred_with_the_same_placeholders() -> None:
    net = nn.Sequential(dnn.Linear(8), dnn.BatchNorm1d(), nn.ReLU(), dnn.Linear(2))
    layers = list(net)
    objects = placeholders(net)
    text = repr(net)
    with pytest.raises(
        di.DeferredInitError,
        match=r"(?s)BatchNorm1d layer '1'.*num_features.*2-d or 3-d.*shape \(8,\).*Fix: ",
    ):
        di.build(net, (5,))  # layer 0 accepts a 1-d input; layer 1 does not
    assert di.pending(net) == ["0", "1", "3"]
    assert all(a is b for a, b in zip(net, layers, strict=True))
    assert all(isinstance(net[i], di.Deferred) for i in (0, 1, 3))
    assert_untouched(net, objects)
    assert repr(net) == text
    di.build(net, (2, 5))  # a corrected call then succeeds
    assert di.is_built(net) and net[0].in_features == 5


def test_torch_error_in_the_model_after_deferred_layers_builds_nothing() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), nn.Linear(6, 2), dnn.Linear(3))
    objects = placeholders(net)
    with pytest.raises(RuntimeError, match=r"8.*6|6.*8"):
        di.build(net, (2, 5))
    assert di.pending(net) == ["0", "3"]
    assert_untouched(net, objects)


class FailsOnSecondConstruction(nn.Module):
    """Constructs on meta and under fake tensors (the layout probe, the shape pass),
    refuses the real construction that allocates memory while ``refuse`` is set."""

    refuse = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        probe = torch.empty(0)
        real = probe.device.type != "meta" and not isinstance(probe, FakeTensor)
        if real and type(self).refuse:
            raise RuntimeError("second construction refused")
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # type: ignore[no-any-return]


def test_failure_while_constructing_for_real_rolls_back_layers_already_constructed() -> None:
    # The shape pass constructs each layer on meta or fake; the failure comes in the
    # real construction, after layer 0 was already constructed for real.
    FailsOnSecondConstruction.refuse = True
    lazy_block = di.defer(FailsOnSecondConstruction, in_dim=di.dim(-1))
    net = nn.Sequential(dnn.Linear(8), lazy_block(out_dim=3), dnn.Linear(2))
    objects = placeholders(net)
    with pytest.raises(
        di.DeferredInitError,
        match=r"(?s)FailsOnSecondConstruction layer '1'.*second construction refused",
    ):
        di.build(net, (2, 5))
    assert di.pending(net) == ["0", "1", "2"]
    assert all(isinstance(m, di.Deferred) for m in net)
    assert_untouched(net, objects)
    FailsOnSecondConstruction.refuse = False
    di.build(net, (2, 5))
    assert di.is_built(net) and net[2].in_features == 3


# --- layers the examples never reach (§3.8) -------------------------------------------


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = dnn.Linear(6)
        self.left = dnn.Linear(3)
        self.right = dnn.Linear(3)
        self.heads = nn.ModuleDict({"aux": dnn.Linear(2)})

    def forward(self, x: torch.Tensor, go_right: bool = False) -> torch.Tensor:
        h = self.trunk(x)
        return self.right(h) if go_right else self.left(h)  # type: ignore[no-any-return]


def test_unreached_layers_raise_not_built_error_listing_them_and_build_nothing() -> None:
    model = Branchy()
    objects = placeholders(model)
    with pytest.raises(
        di.NotBuiltError,
        match=r"(?s)'right', 'heads\.aux'.*Nothing was built.*Fix: .*explicit",
    ) as caught:
        di.build(model, (2, 4))
    assert "'trunk'" not in str(caught.value) and "'left'" not in str(caught.value)
    assert di.pending(model) == ["trunk", "left", "right", "heads.aux"]
    assert_untouched(model, objects)


def test_reaching_every_branch_or_giving_sizes_explicitly_builds() -> None:
    model = Branchy()
    model.right = dnn.Linear(3, in_features=6)
    model.heads["aux"] = dnn.Linear(2, in_features=3)
    di.build(model, (2, 4))
    assert di.is_built(model)


# --- nested deferred blocks ---------------------------------------------------------


class Block(nn.Module):
    """A user block whose own constructor creates deferred layers."""

    def __init__(self, in_dim: int, out_dim: int, lazy: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 16)
        self.norm = dnn.LayerNorm() if lazy else nn.LayerNorm(16)
        self.inner = dnn.Linear(out_dim) if lazy else nn.Linear(16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.relu(self.norm(self.proj(x))))  # type: ignore[no-any-return]


LazyBlock = di.defer(Block, in_dim=di.dim(-1))


def test_nested_deferred_block_builds_fully(assert_same_state: AssertSameState) -> None:
    torch.manual_seed(0)
    net = di.build(nn.Sequential(LazyBlock(out_dim=8)), (2, 5))
    ref = seeded(lambda: nn.Sequential(Block(5, 8, lazy=False)))
    assert di.is_built(net) and di.pending(net) == []
    assert type(net[0]) is Block and type(net[0].inner) is nn.Linear
    assert repr(net) == repr(ref)
    assert_same_state(net, ref)


def test_nested_deferred_block_builds_fully_on_meta() -> None:
    net = di.build(nn.Sequential(LazyBlock(out_dim=8), dnn.Linear(2)), (2, 5), device="meta")
    assert di.is_built(net)
    assert all(p.is_meta for p in net.parameters())
    assert net.get_submodule("0.inner").in_features == 16 and net[1].in_features == 8


def test_nested_deferred_block_followed_by_a_deferred_layer_equals_eager(
    assert_same_state: AssertSameState,
) -> None:
    # Eager construction draws 0.proj, 0.norm, 0.inner, then 1: registration order.
    torch.manual_seed(0)
    net = di.build(nn.Sequential(LazyBlock(out_dim=8), dnn.Linear(4)), (2, 5))
    torch.manual_seed(0)
    ref = nn.Sequential(Block(5, 8, lazy=False), nn.Linear(8, 4))
    assert_same_state(net, ref)


# --- registered initializers (di.initialize, then di.build) ---------------------------


class InitLog:
    """An initializer that draws random numbers (so its order shows in the values)
    and records each layer it was called on."""

    def __init__(self) -> None:
        self.calls: list[nn.Module] = []

    def __call__(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.LayerNorm):
            self.calls.append(module)
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -0.1, 0.1)

    def names(self, root: nn.Module) -> list[str]:
        """The qualified names below ``root`` of the layers called, in call order."""
        names = {id(m): n for n, m in root.named_modules()}
        return [names[id(m)] for m in self.calls]


def initialized(layer: nn.Module, init: InitLog) -> nn.Module:
    """Eager code that initializes a layer on the line that constructs it."""
    layer.apply(init)
    return layer


def mlp_initialized(init: InitLog) -> nn.Module:
    first = initialized(nn.Linear(20, 256), init)
    return nn.Sequential(first, nn.ReLU(), initialized(nn.Linear(256, 10), init))


def reversed_initialized(init: InitLog) -> nn.Module:
    net = Reversed(lazy=False)
    torch.manual_seed(0)
    net.add_module("b", initialized(nn.Linear(8, 4), init))
    net.add_module("a", initialized(nn.Linear(5, 8), init))
    return net


def nested_initialized(init: InitLog) -> nn.Module:
    block = initialized(Block(5, 8, lazy=False), init)
    return nn.Sequential(block, nn.ReLU(), initialized(nn.Linear(8, 4), init))


def nested_net() -> nn.Sequential:
    return nn.Sequential(LazyBlock(out_dim=8), nn.ReLU(), dnn.Linear(4))


@pytest.mark.parametrize(
    ("deferred", "eager", "example"),
    [
        (deferred_mlp, mlp_initialized, (2, 20)),
        (lambda: Reversed(lazy=True), reversed_initialized, (2, 5)),
        (nested_net, nested_initialized, (2, 5)),
    ],
    ids=["mlp", "forward-order-reversed", "nested-block"],
)
def test_build_runs_registered_initializers_as_eager_code_initializing_each_layer(
    deferred: Callable[[], nn.Module],
    eager: Callable[[InitLog], nn.Module],
    example: tuple[int, ...],
    assert_same_state: AssertSameState,
) -> None:
    # di.build constructs in registration order and initializes each layer right
    # after constructing it (a block once the layers inside it are built): an
    # initializer that draws random numbers gives eager's values bitwise.
    ref_log = InitLog()
    torch.manual_seed(0)
    ref = eager(ref_log)
    torch.manual_seed(0)
    net = deferred()
    log = InitLog()
    di.initialize(net, log)
    di.build(net, example)
    assert_same_state(net, ref)
    registered = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear | nn.LayerNorm)]
    assert sorted(log.names(net)) == sorted(registered)  # once per layer
    assert log.names(net) == ref_log.names(ref)  # in eager's order


def test_build_calls_each_registered_initializer_exactly_once_per_layer_in_order() -> None:
    calls: list[nn.Module] = []
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(8), dnn.LayerNorm(), dnn.Linear(2))

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.LayerNorm):
            calls.append(module)

    di.initialize(net, init)
    di.build(net, (3, 5))
    assert calls == [net[0], net[2], net[3], net[4]]
    assert all(c is m for c, m in zip(calls, [net[0], net[2], net[3], net[4]], strict=True))
    net(torch.randn(3, 5))  # the first forward after the build initializes nothing more
    assert len(calls) == 4


def test_build_on_meta_leaves_registered_initializers_to_materialize() -> None:
    # On meta there is nothing to initialize yet (an initializer that reads a value,
    # like a norm, would fail there); di.materialize runs it, once, on real tensors.
    seen: list[str] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            seen.append(module.weight.device.type)
            with torch.no_grad():
                module.weight.div_(module.weight.norm().item())

    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, init)
    di.build(net, (3, 5), device="meta")
    assert seen == []
    di.materialize(net)
    assert seen == ["cpu", "cpu"]
    weight = net[0].get_parameter("weight")
    assert torch.allclose(weight.norm(), torch.tensor(1.0))


@pytest.mark.parametrize("at", [0, 1, 2])
def test_build_is_all_or_nothing_when_an_initializer_is_interrupted(at: int) -> None:
    # Ctrl-C in the middle of the initializers: every layer is left deferred, with
    # the same placeholder objects, and the next build succeeds.
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(8), dnn.Linear(2))
    calls: list[nn.Module] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if len(calls) == at:
                calls.append(module)
                raise KeyboardInterrupt
            calls.append(module)
            nn.init.ones_(module.weight)

    di.initialize(net, init)
    objects = placeholders(net)
    with pytest.raises(KeyboardInterrupt):
        di.build(net, (3, 5))
    assert len(calls) == at + 1
    assert di.pending(net) == ["0", "2", "3"]
    assert all(type(m) is not nn.Linear for m in net)
    assert_untouched(net, objects)
    assert all(isinstance(p, nn.UninitializedParameter) for p in net.parameters())
    at = -1  # the next build runs every initializer through
    di.build(net, (3, 5))
    assert di.is_built(net)
    for layer in (net[0], net[2], net[3]):
        weight = layer.get_parameter("weight")
        assert torch.equal(weight, torch.ones_like(weight))


# --- training after build ---------------------------------------------------------------


def test_optimizer_created_before_build_trains_every_parameter(
    assert_same_state: AssertSameState,
) -> None:
    x, target = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))

    def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()

    torch.manual_seed(0)
    net = deferred_convnet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    di.build(net, x)
    initial = copy.deepcopy(net)
    train(net, optimizer)

    torch.manual_seed(0)
    ref = eager_convnet()
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2))
    assert_same_state(net, ref)
    for name, param in net.named_parameters():
        assert not torch.equal(param, initial.get_parameter(name)), name


# --- other contract points ------------------------------------------------------------


def test_shared_layer_is_built_once_and_stays_shared(assert_same_state: AssertSameState) -> None:
    torch.manual_seed(0)
    shared = dnn.Linear(20)
    net = di.build(nn.Sequential(shared, nn.Tanh(), shared), (2, 20))
    torch.manual_seed(0)
    eager_shared = nn.Linear(20, 20)
    ref = nn.Sequential(eager_shared, nn.Tanh(), eager_shared)
    assert net[0] is net[2] and type(net[0]) is nn.Linear
    assert len(list(net.parameters())) == 2
    assert_same_state(net, ref)


def test_build_of_a_built_model_changes_nothing() -> None:
    net = di.build(deferred_mlp(), (2, 20))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert di.build(net, (7, 20)) is net  # another batch size is fine
    assert torch.equal(rng, torch.random.get_rng_state())
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(di.ShapeMismatchError, match=r"(?s)Linear layer '0'.*in_features=20"):
        di.build(net, (2, 21))


def test_build_keeps_eval_mode_and_requires_grad(assert_same_state: AssertSameState) -> None:
    torch.manual_seed(0)
    net = di.build(deferred_convnet().eval().requires_grad_(False), (2, 1, 16, 16))
    torch.manual_seed(0)
    ref = eager_convnet().eval().requires_grad_(False)
    assert not any(m.training for m in net.modules())
    assert not any(p.requires_grad for p in net.parameters())
    assert_same_state(net, ref)


def test_build_rejects_non_modules_and_negative_shapes() -> None:
    with pytest.raises(TypeError, match=r"di\.build expects an nn\.Module, got int"):
        di.build(3, (2, 20))  # type: ignore[type-var]
    net = deferred_mlp()
    with pytest.raises(ValueError, match=r"negative size: \(2, -1\)"):
        di.build(net, (2, -1))
    assert di.pending(net) == ["0", "2"]
