"""``di.initialize``: MXNet-style initializers that wait for the data.

Eager PyTorch constructs every layer and then initializes; deferinit initializes
each layer right after it builds. Comparisons with eager therefore either apply
the same init to an eager model in the same per-layer order, or use inits whose
values do not depend on the random stream (``ones_``, ``constant_``).
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


# Module level, so that a model holding them pickles.
def fill_half(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.constant_(module.weight, 0.5)


def fill_two(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.constant_(module.weight, 2.0)


def init_normal(module: nn.Module) -> None:
    """d2l's ``init_normal``: it tests ``type(m) == nn.Linear``, so a subclass would skip it."""
    if type(module) == nn.Linear:  # noqa: E721 - the d2l idiom this must keep working
        nn.init.normal_(module.weight, mean=0, std=0.01)
        nn.init.zeros_(module.bias)


ONES = {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_}
ZEROS = {"*": nn.init.zeros_}


def mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(4))


def p_(net: nn.Module, name: str) -> torch.Tensor:
    return net.get_parameter(name).detach()


def is_all(tensor: torch.Tensor, value: float) -> bool:
    return bool((tensor == value).all())


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for name, p in net.named_parameters() if name.endswith("weight")]


def all_equal(net: nn.Module, value: float) -> bool:
    return all(bool((w == value).all()) for w in weights(net))


# --- when the initializer runs ---------------------------------------------------


def test_init_function_runs_at_first_forward_not_at_initialize() -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []

    def record(module: nn.Module) -> None:
        if type(module) is nn.Linear:
            calls.append(("Init weight", tuple(module.weight.shape)))

    net = mlp()
    di.initialize(net, record)
    assert calls == []  # no layer knows its sizes yet: nothing to initialize
    net(torch.randn(2, 20))
    assert calls == [("Init weight", (8, 20)), ("Init weight", (4, 8))]
    net(torch.randn(3, 20))
    assert len(calls) == 2  # once per layer, at its build


def test_printing_init_prints_nothing_until_data_arrives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def announce(module: nn.Module) -> None:
        if type(module) is nn.Linear:
            print("Init", type(module).__name__, tuple(module.weight.shape))

    net = mlp()
    di.initialize(net, announce)
    assert capsys.readouterr().out == ""
    net(torch.randn(2, 20))
    assert capsys.readouterr().out == "Init Linear (8, 20)\nInit Linear (4, 8)\n"


def test_mapping_init_runs_at_build_before_the_first_output() -> None:
    layer = dnn.Linear(3)
    di.initialize(layer, ONES)
    assert isinstance(layer, di.Deferred)
    x = torch.arange(10.0).reshape(2, 5)  # small integers: every sum is exact
    out = layer(x)
    assert torch.equal(out, torch.tensor([[10.0] * 3, [35.0] * 3]))


def test_initialize_returns_the_module() -> None:
    net = mlp()
    assert di.initialize(net, ONES) is net
    assert di.initialize(net) is net
    net(torch.randn(1, 3))
    assert di.initialize(net, fill_half, force_reinit=True) is net


# --- equivalence with eager ----------------------------------------------------


def test_mapping_init_equals_eager_init_applied_layer_by_layer(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(2, 20)
    torch.manual_seed(0)
    net = mlp()
    di.initialize(net, {"*.weight": nn.init.xavier_uniform_, "*.bias": nn.init.zeros_})
    out = net(x)

    torch.manual_seed(0)
    first = nn.Linear(20, 8)  # deferinit builds, then initializes, one layer at a time
    nn.init.xavier_uniform_(first.weight)
    nn.init.zeros_(first.bias)
    second = nn.Linear(8, 4)
    nn.init.xavier_uniform_(second.weight)
    nn.init.zeros_(second.bias)
    eager = nn.Sequential(first, nn.ReLU(), second)

    assert_same_state(net, eager)
    assert torch.equal(out, eager(x))


def test_d2l_init_function_equals_eager_apply_layer_by_layer(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(2, 20)
    torch.manual_seed(0)
    net = mlp()
    di.initialize(net, init_normal)
    out = net(x)

    torch.manual_seed(0)
    first = nn.Linear(20, 8).apply(init_normal)
    second = nn.Linear(8, 4).apply(init_normal)
    eager = nn.Sequential(first, nn.ReLU(), second)

    assert_same_state(net, eager)
    assert torch.equal(out, eager(x))
    assert is_all(p_(net, "0.bias"), 0.0)


def test_deterministic_mapping_equals_eager_model_initialized_after_construction(
    assert_same_state: AssertSameState,
) -> None:
    init = {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_}
    x = torch.randn(4, 3, 6)
    net = nn.Sequential(dnn.Conv1d(5, 3), dnn.BatchNorm1d(), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, init)
    out = net(x)

    eager = nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for name, param in eager.named_parameters():
            for pattern, fn in init.items():
                if fnmatchcase(name, pattern):
                    fn(param)
    expected = eager(x)

    assert_same_state(net, eager)
    assert torch.equal(out, expected)


def test_none_means_each_layers_own_reset_parameters(assert_same_state: AssertSameState) -> None:
    x = torch.randn(2, 20)
    torch.manual_seed(0)
    net = mlp()
    di.initialize(net, fill_half)
    di.initialize(net, None)  # the latest registration wins: back to torch's own init
    out = net(x)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))
    assert_same_state(net, eager)
    assert torch.equal(out, eager(x))


# --- glob patterns -----------------------------------------------------------------


def test_last_matching_pattern_wins() -> None:
    net = mlp()
    di.initialize(net, {"*": nn.init.zeros_, "*.weight": nn.init.ones_})
    net(torch.randn(1, 3))
    assert all_equal(net, 1.0)
    assert all(bool((p == 0).all()) for n, p in net.named_parameters() if n.endswith("bias"))


def test_patterns_are_qualified_below_the_module_given() -> None:
    net = nn.Sequential(
        OrderedDict(encoder=nn.Sequential(dnn.Linear(4), nn.ReLU()), head=dnn.Linear(2))
    )
    di.initialize(net, {"encoder.*": nn.init.ones_})
    di.initialize(
        net.get_submodule("head"), {"weight": nn.init.zeros_}
    )  # relative to the head itself
    net(torch.randn(1, 3))
    assert is_all(p_(net, "encoder.0.weight"), 1.0) and is_all(p_(net, "encoder.0.bias"), 1.0)
    assert is_all(p_(net, "head.weight"), 0.0)
    assert not is_all(p_(net, "head.bias"), 0.0)  # no pattern: torch's own init


def test_star_dot_weight_matches_a_single_layers_own_weight() -> None:
    layer = dnn.Linear(3)
    di.initialize(layer, {"*.weight": nn.init.ones_})
    layer(torch.randn(1, 2))
    assert is_all(p_(layer, "weight"), 1.0)


def test_mapping_reaches_parameters_of_submodules_of_a_layer() -> None:
    layer = dnn.MultiheadAttention(2)
    di.initialize(layer, ZEROS)
    x = torch.randn(3, 1, 4)
    layer(x, x, x)
    assert isinstance(layer, nn.MultiheadAttention)
    names = [name for name, _ in layer.named_parameters()]
    assert "out_proj.weight" in names and "in_proj_weight" in names
    assert all(bool((p == 0).all()) for p in layer.parameters())


# --- layers that are already built --------------------------------------------------


def test_eager_layer_is_initialized_at_once_but_only_once_unless_forced() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, {"*.weight": nn.init.ones_})
    assert is_all(p_(net, "0.weight"), 1.0)  # built already: initialized now
    di.initialize(net, {"*.weight": nn.init.zeros_})
    assert is_all(p_(net, "0.weight"), 1.0)  # deferinit initialized it already
    di.initialize(net, {"*.weight": nn.init.zeros_}, force_reinit=True)
    assert is_all(p_(net, "0.weight"), 0.0)


def test_layer_built_without_initializer_is_initialized_at_once() -> None:
    net = mlp()
    net(torch.randn(1, 3))
    di.initialize(net, {"*.weight": nn.init.ones_})
    assert all_equal(net, 1.0)


def test_layer_initialized_at_build_is_not_reinitialized_without_force() -> None:
    net = mlp()
    di.initialize(net, fill_half)
    net(torch.randn(1, 3))
    assert all_equal(net, 0.5)
    di.initialize(net, fill_two)
    assert all_equal(net, 0.5)
    di.initialize(net, fill_two, force_reinit=True)
    assert all_equal(net, 2.0)


def test_none_on_built_eager_layers_calls_reset_parameters_now(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.manual_seed(1)
    di.initialize(net)
    torch.manual_seed(1)
    for layer in (eager[0], eager[2]):
        assert isinstance(layer, nn.Linear)
        layer.reset_parameters()
    assert_same_state(net, eager)


def test_latest_registration_wins_before_build() -> None:
    calls: list[str] = []

    def record(module: nn.Module) -> None:
        if type(module) is nn.Linear:
            calls.append(type(module).__name__)

    net = mlp()
    di.initialize(net, record)
    di.initialize(net, fill_half)
    net(torch.randn(1, 3))
    assert calls == []
    assert all_equal(net, 0.5)


# --- initializers travel with the model ------------------------------------------------


def test_initializer_survives_reset() -> None:
    net = mlp()
    di.initialize(net, fill_half)
    net(torch.randn(1, 3))
    di.reset(net)
    assert not di.is_built(net)
    net(torch.randn(1, 5))
    assert p_(net, "0.weight").shape == (8, 5)
    assert all_equal(net, 0.5)


def test_latest_registration_on_built_model_is_kept_for_reset() -> None:
    net = mlp()
    di.initialize(net, fill_half)
    net(torch.randn(1, 3))
    di.initialize(net, fill_two)  # no force: values stay, the registration changes
    assert all_equal(net, 0.5)
    di.reset(net)
    net(torch.randn(1, 3))
    assert all_equal(net, 2.0)


def _pickled(net: nn.Module) -> nn.Module:
    copied: nn.Module = pickle.loads(pickle.dumps(net))
    return copied


COPIERS = [pytest.param(copy.deepcopy, id="deepcopy"), pytest.param(_pickled, id="pickle")]


@pytest.mark.parametrize("copier", COPIERS)
def test_initializer_survives_copy_before_build(copier: Callable[[nn.Module], nn.Module]) -> None:
    net = mlp()
    di.initialize(net, fill_half)
    copied = copier(net)
    assert not di.is_built(copied)
    copied(torch.randn(1, 3))
    assert all_equal(copied, 0.5)
    assert not di.is_built(net)  # the original is untouched


@pytest.mark.parametrize("copier", COPIERS)
def test_mapping_initializer_survives_copy_before_build(
    copier: Callable[[nn.Module], nn.Module],
) -> None:
    net = mlp()
    di.initialize(net, {"*.weight": nn.init.ones_, "*.bias": nn.init.zeros_})
    copied = copier(net)
    copied(torch.randn(1, 3))
    assert all_equal(copied, 1.0)


@pytest.mark.parametrize("copier", COPIERS)
def test_initializer_survives_copy_after_build_and_reset(
    copier: Callable[[nn.Module], nn.Module],
) -> None:
    net = mlp()
    di.initialize(net, fill_half)
    net(torch.randn(1, 3))
    copied = copier(net)
    di.reset(copied)
    copied(torch.randn(1, 6))
    assert p_(copied, "0.weight").shape == (8, 6)
    assert all_equal(copied, 0.5)


# --- bad arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    ("init", "match"),
    [
        pytest.param(3, r"init must be a function of a module, a mapping .* got int 3", id="int"),
        pytest.param("xavier", r"init must be a function .* got str 'xavier'", id="str"),
        pytest.param(
            {"*.weight": 3},
            r"a mapping must go from a glob string to an init function .*"
            r"bad entries: \['\*\.weight'\]",
            id="value-not-callable",
        ),
        pytest.param(
            {1: nn.init.zeros_}, r"a mapping must go from a glob string", id="key-not-str"
        ),
    ],
)
def test_bad_init_raises_type_error_with_what_is_accepted(init: Any, match: str) -> None:
    net = mlp()
    with pytest.raises(TypeError, match=match):
        di.initialize(net, init)
    net(torch.randn(1, 3))  # nothing registered: the model still builds as eager


def test_initialize_of_a_non_module_raises_type_error() -> None:
    bad: Any = [dnn.Linear(3)]
    with pytest.raises(TypeError, match=r"di\.initialize expects an nn\.Module, got list"):
        di.initialize(bad, ONES)


def test_force_reinit_is_keyword_only() -> None:
    initialize: Any = di.initialize
    with pytest.raises(TypeError):
        initialize(mlp(), None, True)


def test_di_build_runs_the_registered_initializer_of_every_layer_once() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    seen: list[str] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            seen.append(f"{module.in_features}->{module.out_features}")
            nn.init.constant_(module.weight, 0.5)
            nn.init.zeros_(module.bias)

    di.initialize(net, init)
    di.build(net, (2, 3))
    assert seen == ["3->4", "4->2"]  # registration order, once each
    assert torch.equal(net.get_parameter("0.weight"), torch.full((4, 3), 0.5))
    assert torch.equal(net.get_parameter("2.bias"), torch.zeros(2))
