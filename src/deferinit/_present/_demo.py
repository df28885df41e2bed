"""``deferinit demo``: the deferred-initialization (延后初始化) story, end to end.

The classic d2l example: an MLP written without its input size. The demo shows
the network before its first forward (sizes ``?``, placeholder parameters), an
initializer that is registered early but runs only when the data arrives (as in
MXNet Gluon's demonstration), the build, the same object now being a
``torch.nn.Linear``, and what happens when the input changes.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import TextIO

import torch
from torch import nn

from .. import nn as dnn
from .._become._initialize import initialize
from .._become._reset import is_built, pending
from .._errors import ShapeMismatchError

__all__ = ["run_demo"]


def init_weights(m: nn.Module) -> None:
    if type(m) is nn.Linear:  # exactly torch's class: the deferred layer has become one
        print(f"Init {type(m).__name__} weight {tuple(m.weight.shape)}")
        nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(m.bias)


def _heading(number: int, english: str, chinese: str) -> None:
    print(f"\n=== {number}. {english} / {chinese} ===")


def _code(source: str) -> None:
    """Show the code the next lines of output come from, as in a Python session."""
    for line in source.strip("\n").splitlines():
        print(("... " if line[:1].isspace() else ">>> ") + line)


def _init_source() -> str:
    try:
        return inspect.getsource(init_weights)
    except OSError:  # no source shipped (e.g. a zipped install)
        return "def init_weights(m): ...  # prints 'Init Linear weight (rows, cols)'"


def _story() -> None:
    print("deferinit demo: deferred initialization / 延后初始化")
    print("Sizes are inferred from the first input; the layers then are torch's own.")

    _heading(1, "A network without input sizes", "不指定输入维度的网络")
    _code(
        "import torch\nfrom torch import nn\nimport deferinit as di\n"
        "from deferinit import nn as dnn"
    )
    _code("net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))\nfirst = net[0]")
    net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
    first = net[0]
    _code("print(net)")
    print(net)
    _code("type(first)")
    print(type(first))
    _code('for key, value in net.state_dict().items():\n    print(f"{key:<8} {value!r}")')
    for key, value in net.state_dict().items():
        print(f"{key:<8} {value!r}")
    _code("di.is_built(net), di.pending(net)")
    print((is_built(net), pending(net)))

    _heading(2, "Register an initializer", "注册初始化函数")
    _code(_init_source())
    _code("_ = di.initialize(net, init_weights)")
    initialize(net, init_weights)
    print("(nothing printed: no layer has its sizes yet, so none is initialized now)")

    _heading(3, "The first forward: (2, 20)", "第一次前向传播：(2, 20)")
    _code("X = torch.randn(2, 20)\nnet(X).shape")
    x = torch.randn(2, 20)
    print(net(x).shape)
    print("(the 'Init' lines came from this forward: each layer is initialized when built)")

    _heading(4, "After the build", "构建之后")
    _code("print(net)")
    print(net)
    _code('for name, p in net.named_parameters():\n    print(f"{name:<8} {tuple(p.shape)}")')
    for name, param in net.named_parameters():
        print(f"{name:<8} {tuple(param.shape)}")
    _code("type(first), first is net[0]")
    print((type(first), first is net[0]))
    _code("round(first.weight.std().item(), 3), di.is_built(net), di.pending(net)")
    std = first.get_parameter("weight").std().item()
    print((round(std, 3), is_built(net), pending(net)))

    _heading(5, "A new batch size: (5, 20)", "新的批量大小：(5, 20)")
    _code("net(torch.randn(5, 20)).shape")
    print(net(torch.randn(5, 20)).shape)

    _heading(6, "A different feature size: (3, 30)", "不同的特征维度：(3, 30)")
    _code("net(torch.randn(3, 30))")
    try:
        net(torch.randn(3, 30))
    except ShapeMismatchError as error:
        print(f"{type(error).__name__}: {error}")
    else:  # the contract says this raises
        print("(no error: this is a bug, please report it)")

    _heading(7, "Sizes given explicitly: no deferral", "显式指定维度：不延后")
    _code("layer = dnn.Linear(256, in_features=20)\nprint(layer)")
    layer: nn.Module = dnn.Linear(256, in_features=20)
    print(layer)
    _code("type(layer) is nn.Linear, di.is_built(layer)")
    print((type(layer) is nn.Linear, is_built(layer)))


def run_demo(out: TextIO = sys.stdout) -> None:
    """Print the deferred-initialization story to ``out``.

    Deterministic: it runs under ``torch.manual_seed(0)`` in a forked RNG state,
    so the caller's random state is left as it was.

    >>> import io
    >>> buffer = io.StringIO()
    >>> run_demo(buffer)
    >>> "in_features=?" in buffer.getvalue(), "in_features=20" in buffer.getvalue()
    (True, True)
    """
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        torch.manual_seed(0)
        _story()
