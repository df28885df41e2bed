"""Threads (docs/design.md §3.6): concurrent first calls build each layer once; ``di.build``
racing a forward never lets the forward see meta or fake tensors; deferinit never
forks, reseeds or restores the process-wide default generators.

Every test here is bounded: a fixed number of threads and rounds, a barrier so the
threads start together, and ``join`` with a timeout. Outcomes are deterministic
whatever the interleaving: each result is checked against what every allowed
interleaving gives.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import deferinit as di
from deferinit import nn as dnn

THREADS = 16
JOIN_S = 60.0


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    # Python threads are what these tests race; torch's own pool only adds noise.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_together(jobs: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every job in its own thread, all released at once; return each one's
    result or the exception it raised."""
    start = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            results[i] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a thread hung"
    return results


def deferred_net() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(16), nn.ReLU(), dnn.Linear(16), nn.LayerNorm(16), dnn.Linear(4))


def eager_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4)
    )


def assert_real(output: Any) -> torch.Tensor:
    """A plain CPU tensor: not fake, not meta, not an exception."""
    if isinstance(output, BaseException):
        raise AssertionError(f"the forward raised {type(output).__name__}: {output}")
    assert isinstance(output, torch.Tensor)
    assert not isinstance(output, FakeTensor)
    assert type(output) is torch.Tensor
    assert output.device.type == "cpu"
    tensor: torch.Tensor = output
    return tensor


# --- concurrent first calls -----------------------------------------------------------


class CountingLinear(nn.Linear):
    """nn.Linear that counts its constructions (to check each layer builds once)."""

    made = 0
    lock = threading.Lock()

    def __init__(self, in_features: int, out_features: int) -> None:
        with CountingLinear.lock:
            CountingLinear.made += 1
        super().__init__(in_features, out_features)


LazyCounting = di.defer(CountingLinear, in_features=di.dim(-1))


def test_concurrent_first_calls_on_one_model_build_each_layer_once() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    for round_ in range(100):
        torch.manual_seed(round_)
        net = nn.Sequential(LazyCounting(16), nn.ReLU(), LazyCounting(4))
        CountingLinear.made = 0  # declaring may construct on meta to learn the layout
        outputs = run_together([functools.partial(net, x)] * THREADS)
        assert CountingLinear.made == 2
        assert di.is_built(net)
        # Each layer was built once, from the first call that reached it, and its
        # values are those of an eager layer of the same sizes under the same seed.
        torch.manual_seed(round_)
        eager = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        for got, want in zip(net.parameters(), eager.parameters(), strict=True):
            assert torch.equal(got, want)
        want_out = eager(x)
        for out in outputs:
            assert torch.equal(assert_real(out), want_out)


def test_concurrent_first_calls_on_separate_models_each_equal_their_eager_model() -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(25):
        nets = [deferred_net() for _ in range(THREADS)]
        outputs = run_together([functools.partial(net, x) for net in nets])
        for net, out in zip(nets, outputs, strict=True):
            assert di.is_built(net)
            assert torch.equal(assert_real(out), net(x))
            assert [tuple(p.shape) for p in net.parameters()] == [
                tuple(p.shape) for p in eager_net().parameters()
            ]


# --- di.build racing forwards -----------------------------------------------------------


def racing_model() -> nn.Sequential:
    # Eager layers with real weights and statistics beside deferred ones: the shape
    # pass runs under FakeTensorMode, so a forward that saw its state would get
    # fake tensors or torch-internal assertions.
    return nn.Sequential(
        nn.Linear(8, 8),
        dnn.Linear(16),
        nn.ReLU(),
        dnn.Linear(16),
        nn.BatchNorm1d(16),
        dnn.Linear(4),
    ).eval()


def test_di_build_racing_forwards_never_shows_them_fake_or_meta_tensors() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    for round_ in range(50):
        torch.manual_seed(round_)
        net = racing_model()

        def forward(net: nn.Module = net) -> list[Any]:
            out = []
            for _ in range(3):
                try:
                    out.append(net(x))
                except di.NotBuiltError as error:  # a clear refusal is allowed
                    out.append(error)
            return out

        def build(net: nn.Module = net) -> nn.Module:
            return di.build(net, x)

        results = run_together([build] + [forward] * 3)
        assert results[0] is net, results[0]
        assert di.is_built(net)
        want = net(x)
        for outputs in results[1:]:
            assert isinstance(outputs, list), outputs
            for out in outputs:
                if isinstance(out, di.NotBuiltError):
                    continue
                assert torch.equal(assert_real(out), want)


def test_di_build_racing_forwards_leaves_the_eager_layers_state_alone() -> None:
    # The pass puts fake stand-ins in for real buffers; a forward running meanwhile
    # (training mode) must update the real running statistics, every time.
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    for round_ in range(20):
        torch.manual_seed(round_)
        bn = nn.BatchNorm1d(8)
        net = nn.Sequential(bn, dnn.Linear(4))
        calls = 4
        results = run_together([lambda net=net: di.build(net, x)] + [lambda bn=bn: bn(x)] * calls)
        assert results[0] is net
        for out in results[1:]:
            assert_real(out)
        assert bn.num_batches_tracked is not None
        assert int(bn.num_batches_tracked) == calls
        assert type(bn.running_mean) is torch.Tensor


def test_the_shape_pass_leaves_the_live_model_untouched_while_it_runs() -> None:
    # Looked at from inside the pass (a forward pre-hook the pass runs), the live
    # layers are still deferred with their placeholders, and the live eager
    # layer still holds its real buffer: the pass works on a shadow of the tree.
    net = nn.Sequential(dnn.Linear(8), nn.BatchNorm1d(8), dnn.Linear(2))
    live = list(net)
    seen: list[tuple[bool, bool]] = []

    def look(module: nn.Module, args: Any) -> None:
        seen.append(
            (
                di.pending(net) == ["0", "2"],
                type(live[1].running_mean) is torch.Tensor,
            )
        )

    net[1].register_forward_pre_hook(look)
    di.build(net, (3, 5))
    assert seen == [(True, True)]
    assert [m for m in net] == live
    assert di.is_built(net)


def test_di_reset_racing_forwards_leaves_a_consistent_model() -> None:
    # Forwards racing a reset get real outputs (from the layers before the reset,
    # or rebuilt from their own input) or an error (a call that overlaps the reset
    # of the very layer it runs); never a fake or meta tensor. Afterwards the
    # model is whole: one more call builds what is left and agrees with itself.
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(7))
    for round_ in range(30):
        torch.manual_seed(round_)
        net = deferred_net()
        net(x)

        def forward(net: nn.Module = net) -> list[Any]:
            out = []
            for _ in range(3):
                try:
                    out.append(net(x))
                except Exception as error:  # noqa: BLE001 - classified below
                    out.append(error)
            return out

        results = run_together([lambda net=net: di.reset(net)] + [forward] * 3)
        assert results[0] is net
        for outputs in results[1:]:
            assert isinstance(outputs, list), outputs
            for out in outputs:
                if not isinstance(out, Exception):
                    assert_real(out)
        want = net(x)
        assert di.is_built(net)
        assert torch.equal(assert_real(want), net(x))
        assert [tuple(p.shape) for p in net.parameters()] == [
            tuple(p.shape) for p in eager_net().parameters()
        ]


# --- the default generators ---------------------------------------------------------------


class NoisyBlock(nn.Module):
    """Adds noise drawn on the default device (CPU) whatever device its input is on,
    and uses dropout: random operators in the forward that the shape pass runs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[-1]).to(x.device)  # (C,) drawn on CPU
        out: torch.Tensor = self.drop(self.proj(x) + noise)
        return out


LazyNoisy = di.defer(NoisyBlock, dim=di.dim(-1))


class MakesTensor(nn.Module):
    """A forward that makes a tensor on the default device: meta cannot run it, so the
    shape pass falls back to FakeTensorMode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[-1])


def shape_passes_that_allocate_nothing() -> list[Callable[[], Any]]:
    """Every way deferinit runs a shape-only pass, none of which constructs a real
    tensor (so none may draw a random number from the default generators). The
    models are declared here, before anything is checked: eager layers draw."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    # placeholders only: the pass runs on meta
    plain = nn.Sequential(dnn.Linear(16), nn.ReLU(), dnn.Linear(4))
    # a forward that draws on CPU, and a dropout, in training mode
    noisy = nn.Sequential(LazyNoisy(), dnn.Linear(4))
    # real eager weights beside deferred layers: the pass runs on meta copies of them
    mixed = nn.Sequential(nn.Linear(8, 8), LazyNoisy(), nn.Dropout(), dnn.Linear(4))
    # a forward meta cannot run: the pass runs under FakeTensorMode
    fake = nn.Sequential(nn.Linear(8, 8), MakesTensor(), LazyNoisy(), nn.Dropout(), dnn.Linear(4))
    summarized = nn.Sequential(nn.Linear(8, 8), LazyNoisy(), dnn.Linear(4))
    return [
        lambda: di.build(plain, (2, 8), device="meta"),
        lambda: di.build(noisy, (2, 8), device="meta"),
        lambda: di.build(mixed, x, device="meta"),
        lambda: di.build(fake, x, device="meta"),
        lambda: di.summary(summarized, x),
        lambda: di.summary(nn.Sequential(LazyNoisy(), dnn.Linear(4)), (2, 8)),
    ]


def draw_until(stop: threading.Event, drawn: list[torch.Tensor], ready: threading.Event) -> None:
    ready.set()
    while not stop.is_set() or len(drawn) < 100:
        drawn.append(torch.rand(16))


def test_shape_passes_never_touch_another_threads_random_stream() -> None:
    # The drawing thread must see exactly the stream it would have drawn alone:
    # no repeats (a fork/restore of the default generator) and no skips (a draw
    # from it on the pass's behalf).
    passes = [p for _ in range(6) for p in shape_passes_that_allocate_nothing()]
    torch.manual_seed(123)
    stop, ready = threading.Event(), threading.Event()
    drawn: list[torch.Tensor] = []
    drawer = threading.Thread(target=draw_until, args=(stop, drawn, ready))
    drawer.start()
    try:
        ready.wait(JOIN_S)
        for run in passes:
            run()
    finally:
        stop.set()
        drawer.join(JOIN_S)
    assert not drawer.is_alive()
    alone = torch.Generator().manual_seed(123)
    for i, got in enumerate(drawn):
        assert torch.equal(got, torch.rand(16, generator=alone)), f"draw {i} of {len(drawn)}"


def test_shape_passes_leave_this_threads_random_state_alone() -> None:
    for run in shape_passes_that_allocate_nothing():
        torch.manual_seed(5)
        before = torch.get_rng_state()
        run()
        assert torch.equal(torch.get_rng_state(), before)


def test_a_real_build_racing_a_drawing_thread_never_repeats_its_draws() -> None:
    # Constructing real layers draws from the default generator, as eager
    # construction in another thread would: the drawing thread then skips values,
    # but it never sees one twice (nothing forks or restores the generator).
    # One float per draw: torch.rand takes one 32-bit word per float, so every
    # value the thread gets is a single element of the generator's stream.
    models = [nn.Sequential(nn.Linear(8, 8), LazyNoisy(), dnn.Linear(4)) for _ in range(10)]
    torch.manual_seed(321)
    stop, ready = threading.Event(), threading.Event()
    drawn: list[float] = []

    def draw() -> None:
        ready.set()
        while not stop.is_set() or len(drawn) < 100:
            drawn.append(torch.rand(1).item())

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        ready.wait(JOIN_S)
        for net in models:
            di.build(net, (2, 8))
    finally:
        stop.set()
        drawer.join(JOIN_S)
    stream = torch.rand(len(drawn) + 100_000, generator=torch.Generator().manual_seed(321))
    values = stream.tolist()
    position = 0
    for i, got in enumerate(drawn):
        while position < len(values) and values[position] != got:
            position += 1
        assert position < len(values), f"draw {i} is not later in the stream than draw {i - 1}"
        position += 1


# --- a racing forward never sees a layer before its initializer ran ---------------------


def racing_a_slow_initializer(build: Callable[[nn.Module], Any]) -> tuple[Any, torch.Tensor]:
    """``build(net)`` runs while an initializer of layer 0 waits (up to half a
    second) for another thread's call of that layer to return. Returns what that
    call gave, and the built layer's output for the same input."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    started, called = threading.Event(), threading.Event()

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            started.set()
            called.wait(0.5)  # the racing call returns first if nothing holds it back
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, init)
    got: list[Any] = []

    def race() -> None:
        started.wait(JOIN_S)
        try:
            got.append(net[0](x))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            got.append(error)
        called.set()

    racer = threading.Thread(target=race)
    racer.start()
    build(net)
    racer.join(JOIN_S)
    assert not racer.is_alive()
    return got[0], net[0](x)


@pytest.mark.parametrize(
    "build",
    [lambda net: di.build(net, (3, 5)), lambda net: net(torch.randn(3, 5))],
    ids=["di.build", "first-forward"],
)
def test_a_racing_call_never_sees_a_layer_before_its_initializer_ran(
    build: Callable[[nn.Module], Any],
) -> None:
    got, want = racing_a_slow_initializer(build)
    assert torch.equal(assert_real(got), want)
