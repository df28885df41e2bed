"""Print the real message of every error case listed in docs/errors.md.

The catalogue's example messages come from running this script, never from
memory: run it after changing a message and paste what changed.

    python tools/error_examples.py
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable

import torch
import torch.nn.utils.prune
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = dnn.Linear(4)
        self.head = dnn.Linear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(3))


class Computed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("table", torch.arange(4.0))

    def reset_parameters(self) -> None:
        self.lin.reset_parameters()


def _file(name: str, content: bytes | None = None, obj: object = None) -> str:
    path = os.path.join(tempfile.mkdtemp(), name)
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    else:
        torch.save(obj, path)
    return path


def shape_inferred() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    net(torch.randn(2, 3))
    net(torch.randn(2, 5))


def shape_explicit() -> None:
    nn.Sequential(dnn.Linear(4, in_features=3))(torch.randn(2, 5))


def shape_tie() -> None:
    net = nn.Sequential(dnn.Linear(10, bias=False))
    net[0].weight = nn.Parameter(torch.randn(10, 4))
    net(torch.randn(2, 6))


def infer_rule() -> None:
    nn.Sequential(dnn.Conv2d(8, 3))(torch.randn(5))


def infer_construct() -> None:
    x = torch.randn(2, 5, 4)
    nn.Sequential(dnn.MultiheadAttention(num_heads=3))[0](x, x, x)


def infer_forward() -> None:
    nn.Sequential(dnn.Linear(4))(torch.ones(2, 3, dtype=torch.long))


def infer_build_dtype() -> None:
    di.build(nn.Sequential(dnn.Linear(4)), torch.ones(2, 3, dtype=torch.long))


def infer_build_negative_shape() -> None:
    di.build(nn.Sequential(dnn.Linear(4)), (2, -1))


class Positives(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


def infer_reads_values() -> None:
    di.build(nn.Sequential(dnn.Linear(4), Positives()), (2, 3))


def not_built_no_examples() -> None:
    di.build(nn.Sequential(dnn.Linear(4)))


def not_built_attribute() -> None:
    _ = dnn.Linear(4).in_features


def not_built_unreached() -> None:
    di.build(Branchy(), (2, 3))


def not_built_materialize() -> None:
    di.materialize(nn.Sequential(dnn.Linear(4)))


def not_built_no_reset() -> None:
    with torch.device("meta"):
        model = nn.Sequential(NoReset())
    di.materialize(model)


def not_built_unset() -> None:
    with torch.device("meta"):
        model = nn.Sequential(Computed())
    di.materialize(model)


def not_built_pickle() -> None:
    deferred = di.defer(nn.Linear, in_features=lambda x: x.shape[-1])
    pickle.dumps(deferred(4))


def not_reset_reparametrized() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    net(torch.rand(4, 5))
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.3)
    di.reset(net)


def _zero_linears(module: nn.Module) -> None:
    if type(module) is nn.Linear:
        nn.init.zeros_(module.weight)


def not_replayable_init_on_meta() -> None:
    net = di.build(nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2)), (1, 4), device="meta")
    net.apply(_zero_linears)
    di.materialize(net)


def not_shape_pass_rejected() -> None:
    di.build(nn.Sequential(nn.Linear(5, 3), dnn.Linear(2)), (2, 20))


def shape_given_explicitly_in_part() -> None:
    dnn.Conv(16, 3, in_channels=3)(torch.randn(2, 5, 9, 9))


def arguments_rejected() -> None:
    dnn.MultiheadAttention(num_heads=0)


def arguments_materialize_on_meta() -> None:
    di.materialize(di.build(nn.Sequential(dnn.Linear(4)), (2, 3), device="meta"), device="meta")


def not_adoptable() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    model[0].weight = nn.Parameter(torch.ones(3, 2))
    di.adopt(model)


def not_fitting_config() -> None:
    config = di.build_config(di.build(nn.Sequential(dnn.Linear(4)), (2, 3)))
    di.build(nn.Sequential(dnn.Conv2d(4, 3)), config=config)


def not_adopted_lazy() -> None:
    di.build(nn.Sequential(nn.LazyLinear(3)), (2, 3))


def load_misfit() -> None:
    state = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(5)}
    di.load_state_dict(nn.Sequential(dnn.Linear(4)), state)


def load_not_a_state_dict() -> None:
    di.load_state_dict(nn.Sequential(dnn.Linear(4)), _file("model.pt", obj=[torch.zeros(1)]))


def load_corrupt() -> None:
    di.load_state_dict(nn.Sequential(dnn.Linear(4)), _file("bad.safetensors", b"garbage"))


def load_code() -> None:
    di.load_state_dict(nn.Sequential(dnn.Linear(4)), _file("bad.pt", b"garbage"))


CASES: dict[str, Callable[[], None]] = {
    name: fn
    for name, fn in list(globals().items())
    if callable(fn)
    and getattr(fn, "__module__", None) == __name__
    and name.split("_")[0] in ("shape", "infer", "not", "arguments", "load")
}


def main() -> None:
    for name, case in CASES.items():
        try:
            case()
        except di.DeferredInitError as error:
            public = next(c for c in type(error).__mro__ if not c.__name__.startswith("_"))
            print(f"{name}: {public.__name__}\n    {error}\n")
        else:
            print(f"{name}: NO ERROR\n")


if __name__ == "__main__":
    main()
