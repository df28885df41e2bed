"""``deferinit demo``: the deferred-initialization (延后初始化) story, step by step.

The story of the tutorial (docs/tutorial.md, after d2l's deferred-initialization
section), told in English or Chinese: why sizes are unknown when a model is written;
an MLP without input sizes, inspected before its first forward; an initializer that
runs only when the sizes are known; the first forward and the sizes after it; batch
sizes that change and a feature size that cannot; explicit sizes; LeNet at two
resolutions; a custom block; a model larger than memory; any model recorded with
``di.deferred_init``; existing ``torch.nn.Lazy*`` code adopted.

Each step is prose in both languages and one piece of code. The code is shown as a
Python session shows it (``>>>``) and run in one namespace, so what is shown is what
runs, in either language.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import torch

__all__ = ["LANGUAGES", "STEPS", "Step", "default_language", "run_demo"]

LANGUAGES = ("en", "zh")


@dataclass(frozen=True)
class Step:
    """One section of the demo: a title and a note in each language, and the code.

    ``raises`` names the error the code's last statement raises on purpose.
    """

    en: tuple[str, str]  # (title, note)
    zh: tuple[str, str]
    code: str
    raises: str | None = None


STEPS = (
    Step(
        en=(
            "Why sizes are unknown when a model is written",
            "Eager PyTorch needs every size written out. Through a CNN that is arithmetic: "
            "LeNet's first dense layer takes 16 * 5 * 5 = 400 features for 28x28 images, "
            "and is wrong for 32x32 ones.",
        ),
        zh=(
            "为什么写模型时还不知道维度",
            "eager 模式的 PyTorch 要求写出每个维度。经过卷积网络时，这需要计算：LeNet 的第一个"
            "全连接层对 28x28 的图像接收 16 * 5 * 5 = 400 个特征，对 32x32 的图像就错了。",
        ),
        code="""
import torch
from torch import nn
import deferinit as di
from deferinit import nn as dnn
eager_lenet = nn.Sequential(
    nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2),
    nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2),
    nn.Flatten(), nn.Linear(16 * 5 * 5, 120))
eager_lenet(torch.rand(1, 1, 32, 32))
""",
        raises="RuntimeError",
    ),
    Step(
        en=(
            "An MLP without input sizes",
            "The deferred twins in deferinit.nn take torch's arguments minus the ones the "
            "input determines: dnn.Linear(256) means out_features=256.",
        ),
        zh=(
            "不写输入维度的多层感知机",
            "deferinit.nn 中的延后孪生层接受 torch 的参数，只是去掉了由输入决定的那些："
            "dnn.Linear(256) 表示 out_features=256。",
        ),
        code="""
net = nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
print(net)
""",
    ),
    Step(
        en=(
            "Inspecting it before the first forward",
            "Unknown sizes show as '?'. The parameters already exist, as placeholders under "
            "the real names: the state dict lists every key, and an optimizer made now "
            "trains the real parameters later.",
        ),
        zh=(
            "第一次前向传播之前：查看网络",
            "未知的维度显示为 '?'。参数已经以占位参数的形式存在，名字与真正的层相同：状态字典"
            "列出所有的键，现在创建的优化器以后也会训练真正的参数。",
        ),
        code="""
print(di.summary(net))
net[0].weight
list(net.state_dict())
di.is_built(net), di.pending(net)
""",
    ),
    Step(
        en=(
            "An initializer that runs when the sizes are known",
            "As MXNet Gluon's net.initialize() in d2l: di.initialize registers the "
            "initializer now; nothing is printed, since no layer knows its sizes yet. The "
            "built layer will be the same object, so its name can be taken now.",
        ),
        zh=(
            "知道维度时才运行的初始化函数",
            "就像 d2l 中 MXNet Gluon 的 net.initialize()：di.initialize 现在注册初始化函数；"
            "没有打印任何内容，因为还没有哪一层知道自己的维度。构建后的层是同一个对象，"
            "所以现在就可以记下它的名字。",
        ),
        code="""
names = {module: name for name, module in net.named_modules()}
def init_weights(module):
    if type(module) == nn.Linear:
        print("Init", f"{names[module]}.weight", tuple(module.weight.shape))
        nn.init.normal_(module.weight, std=0.01)
        nn.init.zeros_(module.bias)
_ = di.initialize(net, init_weights)
""",
    ),
    Step(
        en=(
            "The first forward",
            "Each layer reads its input size off the input, is constructed by torch's own "
            "__init__, and runs the initializer: MXNet's 'Init dense0_weight (256, 20)'.",
        ),
        zh=(
            "第一次前向传播",
            "每一层从输入读出输入维度，由 torch 自己的 __init__ 构造，并运行初始化函数："
            "即 MXNet 的 'Init dense0_weight (256, 20)'。",
        ),
        code="""
X = torch.rand(2, 20)
net(X).shape
""",
    ),
    Step(
        en=(
            "Sizes after the first forward",
            "The network is the one eager PyTorch makes with the sizes written out; each "
            "layer is exactly torch.nn.Linear, and the same object as before.",
        ),
        zh=(
            "第一次前向传播之后的维度",
            "网络与写出维度时 eager PyTorch 构造的网络相同；每一层正是 torch.nn.Linear，"
            "而且与之前是同一个对象。",
        ),
        code="""
print(net)
type(net[0]) is nn.Linear, net[0] in names, di.is_built(net)
""",
    ),
    Step(
        en=(
            "A new batch size works",
            "Only the sizes a layer inferred are fixed; the batch size may change.",
        ),
        zh=("新的批量大小没有问题", "只有层推断出的维度是固定的；批量大小可以改变。"),
        code="""
net(torch.rand(5, 20)).shape
""",
    ),
    Step(
        en=(
            "A new feature size is an error that says what to do",
            "The error names the layer, the size it was built for, what it got, and the fix.",
        ),
        zh=(
            "新的特征维度会报错，并告诉你怎么办",
            "错误信息给出层的名称、构建时的维度、收到的输入，以及修复方法。",
        ),
        code="""
net(torch.rand(2, 30))
""",
        raises="ShapeMismatchError",
    ),
    Step(
        en=(
            "di.reset: infer again",
            "di.reset forgets the inferred sizes; the initializer, hooks and parameter "
            "objects stay, and the next input infers the sizes again.",
        ),
        zh=(
            "di.reset：重新推断",
            "di.reset 忘记推断出的维度；初始化函数、钩子和参数对象都保留，下一次输入重新推断维度。",
        ),
        code="""
_ = di.reset(net)
net(torch.rand(2, 30)).shape
""",
    ),
    Step(
        en=(
            "An explicit size skips the deferral",
            "An inferred argument given by keyword builds the layer at once, like Keras' "
            "input_shape or Gluon's in_units.",
        ),
        zh=(
            "显式给出维度就不再延后",
            "用关键字参数给出要推断的参数，层会立即构建，就像 Keras 的 input_shape 或 Gluon 的 "
            "in_units。",
        ),
        code="""
layer = dnn.Linear(256, in_features=20)
layer, type(layer) is nn.Linear, di.is_built(layer)
""",
    ),
    Step(
        en=(
            "LeNet at 28x28, then at 32x32",
            "Written with twins, LeNet has no size computed by hand. di.build infers every "
            "size from a shape alone, computing nothing.",
        ),
        zh=(
            "LeNet：先 28x28，再 32x32",
            "用孪生层写 LeNet，不需要手工计算任何维度。"
            "di.build 只凭形状推断每个维度，不做任何计算。",
        ),
        code="""
def lenet():
    return nn.Sequential(
        dnn.Conv2d(6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2),
        dnn.Conv2d(16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Flatten(), dnn.Linear(120), nn.Sigmoid(), dnn.Linear(84), nn.Sigmoid(),
        dnn.Linear(10))
for size in (28, 32):
    print(f"{size}x{size}:", di.build(lenet(), (1, 1, size, size))[7])
""",
    ),
    Step(
        en=(
            "A custom block with di.defer",
            "Any module class becomes deferrable with one line; di.dim(-1) is the size of "
            "the last dimension of the first forward argument.",
        ),
        zh=(
            "用 di.defer 自定义块",
            "任何模块类只需一行就能变成可延后的；di.dim(-1) 表示第一个前向参数最后一维的大小。",
        ),
        code="""
class MLP(nn.Module):
    def __init__(self, in_features, hidden, out_features):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, out_features)
    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))
LazyMLP = di.defer(MLP, in_features=di.dim(-1))
block = LazyMLP(hidden=256, out_features=10)
block
block(torch.rand(2, 20)).shape, type(block) is MLP, block.hidden
""",
    ),
    Step(
        en=(
            "A model larger than memory",
            "di.build(..., device='meta') infers every size and allocates nothing: 32 GiB of "
            "parameters, summarized. di.materialize allocates and initializes, here on a "
            "width that fits, bitwise equal to eager under the same seed.",
        ),
        zh=(
            "大于内存的模型",
            "di.build(..., device='meta') 推断每个维度，却不分配任何内存：32 GiB 的参数，照样汇总。"
            "di.materialize 分配并初始化参数；这里用放得下的宽度，"
            "与相同随机种子下的 eager 逐位相等。",
        ),
        code="""
def wide_mlp(width):
    return nn.Sequential(dnn.Linear(width), nn.GELU(), dnn.Linear(width), nn.GELU(),
                         dnn.Linear(10))
big = di.build(wide_mlp(65536), (1, 65536), device="meta")
print(di.summary(big))
small = di.build(wide_mlp(256), (1, 256), device="meta")
_ = torch.manual_seed(0)
_ = di.materialize(small)
_ = torch.manual_seed(0)
eager = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                      nn.Linear(256, 10))
all(torch.equal(a, b) for a, b in zip(small.parameters(), eager.parameters()))
""",
    ),
    Step(
        en=(
            "Any model: di.deferred_init",
            "di.deferred_init records a whole construction (its own init code included; "
            "Hugging Face models too) with every tensor on meta; di.materialize replays it, "
            "bitwise eager under the same seed.",
        ),
        zh=(
            "任意模型：di.deferred_init",
            "di.deferred_init 记录整个构造过程"
            "（包括模型自己的初始化代码；Hugging Face 模型也可以），"
            "所有张量都在 meta 上；di.materialize 重放它，与相同随机种子下的 eager 逐位相等。",
        ),
        code="""
def make_mlp():
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    for layer in (mlp[0], mlp[2]):
        nn.init.normal_(layer.weight, std=0.01)
    return mlp
recorded = di.deferred_init(make_mlp)
recorded[0].weight.device
_ = torch.manual_seed(0)
_ = di.materialize(recorded)
_ = torch.manual_seed(0)
all(torch.equal(a, b) for a, b in zip(recorded.parameters(), make_mlp().parameters()))
""",
    ),
    Step(
        en=(
            "Adopting existing torch.nn.Lazy* code",
            "di.adopt turns torch's Lazy modules into deferinit twins in place, keeping the "
            "parameter objects: '?' in the repr, di.initialize, di.build and named errors.",
        ),
        zh=(
            "接管现有的 torch.nn.Lazy* 代码",
            "di.adopt 把 torch 的 Lazy 模块原地变成 deferinit 的孪生层，保留参数对象："
            "repr 中的 '?'、"
            "di.initialize、di.build 以及给出层名的错误信息。",
        ),
        code="""
legacy = nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))
_ = di.adopt(legacy)
legacy[0]
_ = di.build(legacy, (2, 20))
legacy[0], type(legacy[0]) is nn.Linear
""",
    ),
)

_TITLE = {
    "en": "deferinit demo: deferred initialization (延后初始化), step by step",
    "zh": "deferinit 演示：延后初始化（deferred initialization），一步一步",
}
_FILE = "<deferinit demo>"
_UNEXPECTED = {
    "en": "(no error: this is a bug in deferinit, please report it)",
    "zh": "（没有报错：这是 deferinit 的缺陷，请报告）",
}


def default_language(environ: Mapping[str, str] | None = None) -> str:
    """The demo's language from the locale: ``zh`` when the first of ``LC_ALL``,
    ``LC_MESSAGES`` and ``LANG`` that is set starts with ``zh``, else ``en``.

    >>> default_language({"LANG": "zh_CN.UTF-8"}), default_language({"LANG": "C.UTF-8"})
    ('zh', 'en')
    >>> default_language({"LC_ALL": "en_US.UTF-8", "LANG": "zh_TW.UTF-8"})
    'en'
    """
    environ = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = environ.get(name, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def run_demo(out: TextIO = sys.stdout, language: str = "en") -> None:
    """Print the deferred-initialization story to ``out``, in ``language`` (``en`` or ``zh``).

    Deterministic: it runs under ``torch.manual_seed(0)`` in a forked random state, so
    the caller's random state is left as it was.

    >>> import io
    >>> buffer = io.StringIO()
    >>> run_demo(buffer, "zh")
    >>> "in_features=?" in buffer.getvalue(), "第一次前向传播" in buffer.getvalue()
    (True, True)
    """
    if language not in LANGUAGES:
        raise ValueError(f"run_demo: language {language!r} is not one of {LANGUAGES}")
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        torch.manual_seed(0)
        print(_TITLE[language])
        namespace: dict[str, Any] = {"__name__": "__deferinit_demo__"}
        for number, step in enumerate(STEPS, 1):
            title, note = step.en if language == "en" else step.zh
            text = textwrap.fill(note, width=88) if language == "en" else note
            print(f"\n=== {number}. {title} ===\n{text}\n")
            _run_step(step, namespace, language)


def _run_step(step: Step, namespace: dict[str, Any], language: str) -> None:
    code = step.code.strip("\n")
    statements = ast.parse(code).body
    source = code.splitlines()
    for index, statement in enumerate(statements):
        _show(source[statement.lineno - 1 : statement.end_lineno])
        if index == len(statements) - 1 and step.raises is not None:
            _run_expecting(statement, step.raises, namespace, language)
        else:
            _run(statement, namespace)


def _show(lines: list[str]) -> None:
    for line in lines:
        print(("... " if line[:1].isspace() or line.startswith(")") else ">>> ") + line)


def _run(statement: ast.stmt, namespace: dict[str, Any]) -> None:
    """Run one statement; an expression's value is shown as a Python session shows it."""
    if isinstance(statement, ast.Expr):
        value = eval(compile(ast.Expression(statement.value), _FILE, "eval"), namespace)
        if value is not None:
            print(repr(value))
    else:
        exec(compile(ast.Module(body=[statement], type_ignores=[]), _FILE, "exec"), namespace)


def _run_expecting(
    statement: ast.stmt, error: str, namespace: dict[str, Any], language: str
) -> None:
    try:
        _run(statement, namespace)
    except Exception as caught:
        if type(caught).__name__ != error:
            raise
        print(f"{type(caught).__name__}: {caught}")  # as the last line of a traceback
    else:
        print(_UNEXPECTED[language])
