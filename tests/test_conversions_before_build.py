"""Every conversion ``nn.Module`` offers, applied before the build, carries over to
the built layer as eager's does after construction (DESIGN §3.2), and a malformed
``di.dim`` is refused where it is written."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Move = Callable[[nn.Module], nn.Module]

MOVES: dict[str, Move] = {
    "bfloat16()": lambda m: m.bfloat16(),
    "type(float64)": lambda m: m.type(torch.float64),
    "half()": lambda m: m.half(),
    "to(bfloat16)": lambda m: m.to(torch.bfloat16),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_a_conversion_before_the_build_equals_eager_converted_after(move: Move) -> None:
    x = torch.rand(2, 20)
    torch.manual_seed(0)
    deferred = move(nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(3)))
    deferred(x.to(next(deferred.parameters()).dtype))
    torch.manual_seed(0)
    eager = move(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)))
    ours, theirs = deferred.state_dict(), eager.state_dict()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_to_meta_before_the_build_builds_on_meta_keeping_waiting_init() -> None:
    layer = dnn.Linear(8)
    nn.init.zeros_(layer.bias)  # waits for the build, through the move
    net = nn.Sequential(layer)
    net.to("meta")
    assert net[0].weight.device.type == "meta"
    assert not di.is_built(net)
    di.build(net, (2, 5))
    assert net[0].in_features == 5 and net[0].weight.device.type == "meta"


def test_to_meta_before_the_build_then_a_meta_forward_builds() -> None:
    net = nn.Sequential(dnn.Linear(8)).to("meta")
    out = net(torch.rand(2, 5, device="meta"))
    assert out.shape == (2, 8) and net[0].weight.is_meta and type(net[0]) is nn.Linear


@pytest.mark.parametrize(
    ("args", "kwargs", "says"),
    [
        (("a",), {}, "axis must be an int"),
        ((1.0,), {}, "axis must be an int"),
        ((True,), {}, "axis must be an int"),
        ((1, 2.0), {}, "arg must be a position"),
        ((-1,), {"ndim": "2"}, "ndim must be an int or a tuple of ints"),
        ((-1,), {"ndim": ()}, "ndim must be an int or a tuple of ints"),
    ],
)
def test_a_malformed_dim_rule_is_refused_where_it_is_written(
    args: tuple[object, ...], kwargs: dict[str, object], says: str
) -> None:
    with pytest.raises(TypeError, match=rf"di.dim: {says}.*Fix"):
        di.dim(*args, **kwargs)  # type: ignore[arg-type]


def test_well_formed_dim_rules_are_accepted() -> None:
    assert di.dim(-1).axis == -1
    assert di.dim(1, arg="x", ndim=(3, 4)).ndim == (3, 4)
    assert di.dim(1, 2, 4).arg == 2


def test_init_waiting_on_a_placeholder_survives_a_move_to_meta() -> None:
    layer = dnn.Linear(4)
    nn.init.ones_(layer.bias)
    net = nn.Sequential(layer).to("meta")
    di.build(net, (2, 3))
    torch.manual_seed(0)
    di.materialize(net)
    torch.manual_seed(0)
    eager = nn.Linear(3, 4)
    nn.init.ones_(eager.bias)
    built = net[0]
    assert isinstance(built, nn.Linear)
    assert torch.equal(built.weight, eager.weight) and torch.equal(built.bias, eager.bias)


@pytest.mark.parametrize("device", [None, "meta"], ids=["cpu", "meta"])
def test_di_build_of_a_model_converted_before_the_build_runs_in_its_dtype(
    device: str | None,
) -> None:
    # The shape pass's copies are constructed in the declared dtype: a float64 example
    # must still reach a Conv2d converted with .double(), as the first forward does.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(dnn.Conv2d(4, 3), nn.Flatten(), dnn.Linear(10)).double()
    di.build(model, x, device=device)
    torch.manual_seed(0)
    if device == "meta":
        di.materialize(model)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10)).double()
    ours, theirs = model.state_dict(), eager.state_dict()
    assert all(ours[k].dtype == torch.float64 and torch.equal(ours[k], theirs[k]) for k in theirs)
