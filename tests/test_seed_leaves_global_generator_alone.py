"""``di.materialize(seed=)`` leaves the process-wide generators alone (DESIGN §3.6;
docs/guarantees.md): every draw comes from a tensor's own generator, so nothing
is saved and put back, and another thread's draws made meanwhile are never rewound.
Covered in the calling thread: a single layer, any model under one torch thread,
the one-tensor-at-a-time way (an initialization ``seeded_whole`` cannot follow),
and construction code drawing on the CPU explicitly (the dry run on meta)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Make = Callable[[], nn.Module]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Every layer filled by the calling thread, as under ``torch.set_num_threads(1)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def never_put_back(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The process-wide generators' setters, recording each call instead."""
    calls: list[str] = []
    for owner, name in [
        (torch, "set_rng_state"),
        (torch.random, "set_rng_state"),
        (torch.cuda, "set_rng_state"),
        (torch.cuda, "set_rng_state_all"),
        (torch.cuda, "get_rng_state"),
        (torch.cuda, "manual_seed"),
        (random, "setstate"),
    ]:
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def linears(count: int, width: int = 16) -> nn.Module:
    net = nn.Sequential(*[dnn.Linear(width) for _ in range(count)])
    built: nn.Module = di.build(net, torch.randn(1, width), device="meta")
    return built


class DrawsOnCPU(nn.Module):
    """Construction code that draws on the CPU whatever the default device."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.register_buffer("noise", torch.randn(n, device="cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def draws_on_cpu() -> nn.Module:
    built: nn.Module = di.build(
        nn.Sequential(di.defer(DrawsOnCPU, n=di.dim(-1))()), torch.randn(1, 8), device="meta"
    )
    return built


def orthogonal_reset(self: nn.Linear) -> None:
    """Fills a scratch matrix (``orthogonal_``): the one-run streams give up."""
    nn.init.orthogonal_(self.weight)
    nn.init.zeros_(self.bias)


MODELS: dict[str, Make] = {
    "one layer": lambda: linears(1),
    "eight layers": lambda: linears(8),
    "draws on the cpu": draws_on_cpu,
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_seeded_materialize_in_one_thread_never_sets_a_generator(
    make: Make, never_put_back: list[str]
) -> None:
    model = make()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    di.materialize(model, seed=7)
    assert never_put_back == []
    assert torch.equal(torch.get_rng_state(), before)
    assert not any(t.is_meta for t in model.parameters())


@pytest.mark.usefixtures("one_thread")
def test_one_tensor_at_a_time_never_sets_a_generator(
    monkeypatch: pytest.MonkeyPatch, never_put_back: list[str]
) -> None:
    model = linears(2)
    monkeypatch.setattr(nn.Linear, "reset_parameters", orthogonal_reset)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    di.materialize(model, seed=7)
    assert never_put_back == []
    assert torch.equal(torch.get_rng_state(), before)
    weight = model.get_parameter("0.weight").detach()
    assert torch.allclose(weight @ weight.T, torch.eye(16), atol=1e-5)


def test_seeded_values_do_not_depend_on_the_global_generator(one_thread: None) -> None:
    torch.manual_seed(0)
    a = di.materialize(linears(3), seed=7)
    torch.manual_seed(1)
    b = di.materialize(linears(3), seed=7)
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


def _in_another_thread(draws: list[int]) -> None:
    """Draws from the global generator in a thread of its own, now, and waits."""

    def run() -> None:
        torch.rand(7)
        draws.append(1)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def _another_thread_draws_during(
    monkeypatch: pytest.MonkeyPatch, reset: Callable[[nn.Linear], None]
) -> list[int]:
    """``nn.Linear.reset_parameters`` first lets another thread draw from the
    global generator (deterministically: started and joined inside)."""
    draws: list[int] = []

    def reset_meanwhile(self: nn.Linear) -> None:
        if not self.weight.is_meta:
            _in_another_thread(draws)
        reset(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", reset_meanwhile)
    return draws


RESETS: dict[str, Any] = {
    "in one run": nn.Linear.reset_parameters,
    "one tensor at a time": orthogonal_reset,
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("reset", RESETS.values(), ids=RESETS.keys())
def test_draws_another_thread_makes_during_a_seeded_fill_are_kept(
    monkeypatch: pytest.MonkeyPatch, layers: int, reset: Callable[[nn.Linear], None]
) -> None:
    model = linears(layers)
    draws = _another_thread_draws_during(monkeypatch, reset)
    torch.manual_seed(123)
    di.materialize(model, seed=7)
    assert draws  # the other thread drew while layers were filled
    got = torch.rand(5)
    torch.manual_seed(123)
    for _ in draws:
        torch.rand(7)
    assert torch.equal(got, torch.rand(5))  # its draws are not rewound


def _other(out: list[float], go: threading.Barrier) -> None:
    go.wait()
    for _ in range(2000):
        out.append(torch.rand(1).item())


def _sequence_of_another_thread(model: nn.Module | None) -> list[float]:
    torch.manual_seed(123)
    got: list[float] = []
    go = threading.Barrier(2)
    thread = threading.Thread(target=_other, args=(got, go))
    thread.start()
    go.wait()
    if model is not None:
        di.materialize(model, seed=7)
    thread.join()
    return got


@pytest.mark.parametrize("layers", [1, 8])
def test_another_threads_draws_racing_a_seeded_materialize_are_its_own(layers: int) -> None:
    model = linears(layers, width=256)
    assert _sequence_of_another_thread(model) == _sequence_of_another_thread(None)


def test_a_failed_seeded_materialize_leaves_the_global_generator_as_it_is() -> None:
    class BoomError(Exception):
        pass

    def fail(module: nn.Module) -> None:
        other = threading.Thread(target=torch.rand, args=(1,))  # another thread's draw
        other.start()
        other.join()
        raise BoomError

    net = nn.Sequential(dnn.Linear(8), dnn.Linear(4))
    di.build(net, (2, 3), device="meta")
    di.initialize(net[1], fail)
    torch.manual_seed(5)
    with pytest.raises(di.DeferredInitError):
        di.materialize(net, seed=1)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.rand(1)
    assert torch.equal(after, torch.get_rng_state())  # the draw stands, nothing put back
