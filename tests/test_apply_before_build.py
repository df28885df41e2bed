"""``Module.apply(fn)`` on a model whose deferred layers are not built yet (docs/design.md
§3.3: init code applied before the sizes are known runs when the layer is built;
nothing is silently lost).

A deferred layer queues ``fn`` and runs it on the built layer right after that
layer's own construction (and its registered initializer), as eager
``construct; net.apply(fn)`` would run it on that layer. Eager constructs every
layer before applying; deferinit applies to each layer as it builds. So values
equal eager's ``construct all; net.apply(fn)`` where ``fn`` draws no random numbers
(``zeros_``, ``constant_``), and eager's "construct, apply" layer by layer where it does.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


# Module level, so that a model holding them pickles.
def zero_linear(module: nn.Module) -> None:
    """d2l's idiom: ``type(m) == nn.Linear``."""
    if type(module) == nn.Linear:  # noqa: E721 - the d2l idiom this must keep working
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)


def xavier_linear(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.xavier_uniform_(module.weight)


def add_one(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        with torch.no_grad():
            module.weight.add_(1.0)


def mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))


def eager_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


def p_(net: nn.Module, name: str) -> torch.Tensor:
    return net.get_parameter(name).detach()


def assert_same(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key


def test_apply_before_the_first_forward_runs_at_the_build() -> None:
    torch.manual_seed(0)
    net = mlp()
    assert net.apply(zero_linear) is net
    net(torch.rand(4, 5))
    assert p_(net, "0.weight").abs().sum() == 0
    assert p_(net, "2.bias").abs().sum() == 0


def test_deterministic_fn_equals_eager_construct_then_apply() -> None:
    x = torch.rand(4, 5)
    torch.manual_seed(0)
    net = mlp().apply(add_one)
    out = net(x)
    torch.manual_seed(0)
    eager = eager_mlp().apply(add_one)
    assert_same(net, eager)
    assert torch.equal(out, eager(x))


def test_random_fn_equals_eager_construct_and_apply_layer_by_layer() -> None:
    x = torch.rand(4, 5)
    torch.manual_seed(0)
    net = mlp().apply(xavier_linear)
    net(x)
    torch.manual_seed(0)
    first = nn.Linear(5, 8).apply(xavier_linear)
    second = nn.Linear(8, 2).apply(xavier_linear)
    assert_same(net, nn.Sequential(first, nn.ReLU(), second))


@pytest.mark.parametrize("device", [None, "meta"])
def test_di_build_and_materialize_run_it(device: str | None) -> None:
    torch.manual_seed(0)
    net = di.build(mlp().apply(add_one), (4, 5), device=device)
    if device == "meta":
        assert p_(net, "0.weight").is_meta
        torch.manual_seed(0)
        di.materialize(net)
    torch.manual_seed(0)
    assert_same(net, eager_mlp().apply(add_one))


def test_random_fn_with_di_build_on_meta_then_materialize() -> None:
    net = di.build(mlp().apply(xavier_linear), (4, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(net)
    torch.manual_seed(0)
    first = nn.Linear(5, 8).apply(xavier_linear)
    second = nn.Linear(8, 2).apply(xavier_linear)
    assert_same(net, nn.Sequential(first, nn.ReLU(), second))


def test_seeded_materialize_runs_it() -> None:
    net = di.build(mlp().apply(zero_linear), (4, 5), device="meta")
    di.materialize(net, seed=0)
    assert p_(net, "0.weight").abs().sum() == 0
    assert p_(net, "2.bias").abs().sum() == 0


def test_a_recorded_construction_applying_to_twins_runs_it() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()
            self.apply(add_one)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # type: ignore[no-any-return]

    model = di.build(di.deferred_init(Model), (4, 5), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert_same(model.body, eager_mlp().apply(add_one))


def test_built_layers_get_fn_at_once_deferred_ones_at_their_build() -> None:
    net = nn.Sequential(nn.Linear(5, 8), dnn.Linear(2))
    net.apply(zero_linear)
    assert p_(net, "0.weight").abs().sum() == 0  # eager torch: at once
    assert isinstance(net[1], di.Deferred)
    net(torch.rand(2, 5))
    assert p_(net, "1.weight").abs().sum() == 0


def test_several_applies_run_in_order() -> None:
    net = mlp()
    net.apply(zero_linear).apply(add_one)
    net(torch.rand(2, 5))
    assert bool((p_(net, "0.weight") == 1).all())


def test_fn_runs_after_the_registered_initializer() -> None:
    net = mlp()
    di.initialize(net, {"*.weight": nn.init.ones_})
    net.apply(add_one)
    net(torch.rand(2, 5))
    assert bool((p_(net, "0.weight") == 2).all())


def test_initialize_after_apply_keeps_the_applied_fn() -> None:
    net = mlp()
    net.apply(add_one)
    di.initialize(net, {"*.weight": nn.init.ones_})
    net(torch.rand(2, 5))
    assert bool((p_(net, "2.weight") == 2).all())
    other = mlp()
    other.apply(zero_linear)
    di.initialize(other, None)  # each layer's own init: the applied fn still runs after it
    other(torch.rand(2, 5))
    assert p_(other, "0.weight").abs().sum() == 0


def test_apply_alone_does_not_count_as_initialized_by_deferinit() -> None:
    # di.initialize initializes a built layer deferinit never initialized.
    net = mlp().apply(add_one)
    net(torch.rand(2, 5))
    di.initialize(net, {"*.weight": nn.init.ones_})
    assert bool((p_(net, "0.weight") == 1).all())


def test_reset_keeps_it_for_the_next_build() -> None:
    net = mlp().apply(zero_linear)
    net(torch.rand(2, 5))
    di.reset(net)
    net(torch.rand(2, 7))
    assert p_(net, "0.weight").shape == (8, 7)
    assert p_(net, "0.weight").abs().sum() == 0


def test_deepcopy_and_pickle_keep_it() -> None:
    net = mlp().apply(zero_linear)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        copied(torch.rand(2, 5))
        assert p_(copied, "0.weight").abs().sum() == 0
    assert isinstance(net[0], di.Deferred)


def test_a_failing_fn_names_apply_and_leaves_the_layer_deferred() -> None:
    def broken(module: nn.Module) -> None:
        if type(module) is nn.Linear:
            raise RuntimeError("boom")

    net = mlp()
    net.apply(broken)
    with pytest.raises(di.DeferredInitError, match=r"(?s)Linear layer '0'.*broken.*Module\.apply"):
        net(torch.rand(2, 5))
    assert isinstance(net[0], di.Deferred)


def test_fn_is_not_called_on_the_placeholder() -> None:
    seen: list[type[nn.Module]] = []
    net = mlp()
    net.apply(lambda m: seen.append(type(m)))
    assert seen == [nn.ReLU, nn.Sequential]
    net(torch.rand(2, 5))
    assert seen[2:] == [nn.Linear, nn.Linear]


def test_apply_racing_a_build_runs_fn_once() -> None:
    for _ in range(20):
        net = mlp()
        calls: list[int] = []
        barrier = threading.Barrier(2)

        def count(module: nn.Module, calls: list[int] = calls) -> None:
            if type(module) is nn.Linear:
                calls.append(1)

        def build(net: nn.Module = net, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            net(torch.rand(2, 5))

        thread = threading.Thread(target=build)
        thread.start()
        barrier.wait()
        net.apply(count)
        thread.join()
        assert len(calls) == 2


def test_a_failing_fn_in_di_build_leaves_every_layer_deferred() -> None:
    def broken(module: nn.Module) -> None:
        if type(module) is nn.Linear and module.out_features == 2:
            raise ValueError("nope")

    net = mlp().apply(broken)
    with pytest.raises(di.DeferredInitError, match=r"Linear layer '2': the function .*broken"):
        di.build(net, (3, 5))
    assert di.pending(net) == ["0", "2"]
