"""Errors (docs/design.md §3.5): bad input never half-builds, and every message
names the layer, what it expected and what it got.

Each case in ``BAD_FIRST_CALLS`` is a deferred layer, a first input it must reject,
and a corrected input after which it must equal the eager layer bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import deferinit as di
import test_layers as layers
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


@dataclass(frozen=True)
class BadFirstCall:
    id: str
    deferred: Callable[[], nn.Module]
    bad: Callable[[], Any]
    error: type[di.DeferredInitError]
    match: str
    good: Callable[[], torch.Tensor]
    eager: Callable[[], nn.Module]


BAD_FIRST_CALLS = [
    BadFirstCall(
        "conv2d-given-2d",
        lambda: dnn.Conv2d(6, kernel_size=5),
        lambda: torch.randn(2, 3),
        di.InferenceError,
        r"Conv2d layer '0' cannot infer in_channels .*expected a 3-d or 4-d tensor, "
        r"got a float32 tensor of shape \(2, 3\)",
        lambda: torch.randn(2, 3, 8, 8),
        lambda: nn.Conv2d(3, 6, kernel_size=5),
    ),
    BadFirstCall(
        "batchnorm2d-given-3d",
        lambda: dnn.BatchNorm2d(),
        lambda: torch.randn(2, 3, 4),
        di.InferenceError,
        r"BatchNorm2d layer '0' cannot infer num_features .*expected a 4-d tensor, "
        r"got a float32 tensor of shape \(2, 3, 4\)",
        lambda: torch.randn(2, 3, 4, 4),
        lambda: nn.BatchNorm2d(3),
    ),
    BadFirstCall(
        "linear-given-int64",
        lambda: dnn.Linear(4),
        lambda: torch.ones(2, 3, dtype=torch.int64),
        di.InferenceError,
        r"Linear layer '0'.*int64 tensor of shape \(2, 3\).*Long and Float.*"
        r"expects.*floating-point tensor",
        lambda: torch.randn(2, 3),
        lambda: nn.Linear(3, 4),
    ),
    BadFirstCall(
        "conv1d-given-int32",
        lambda: dnn.Conv1d(4, kernel_size=3),
        lambda: torch.ones(2, 3, 8, dtype=torch.int32),
        di.InferenceError,
        r"Conv1d layer '0'.*int32 tensor of shape \(2, 3, 8\).*expects.*floating-point",
        lambda: torch.randn(2, 3, 8),
        lambda: nn.Conv1d(3, 4, kernel_size=3),
    ),
    BadFirstCall(
        "linear-given-zero-features",
        lambda: dnn.Linear(4),
        lambda: torch.randn(2, 0),
        di.InferenceError,
        r"Linear layer '0' cannot infer in_features .*expected a non-zero size on axis -1.*"
        r"got a float32 tensor of shape \(2, 0\)",
        lambda: torch.randn(2, 3),
        lambda: nn.Linear(3, 4),
    ),
    BadFirstCall(
        "conv2d-given-zero-channels",
        lambda: dnn.Conv2d(4, kernel_size=3),
        lambda: torch.randn(2, 0, 8, 8),
        di.InferenceError,
        r"Conv2d layer '0' cannot infer in_channels .*expected a non-zero size on axis -3.*"
        r"got a float32 tensor of shape \(2, 0, 8, 8\)",
        lambda: torch.randn(2, 3, 8, 8),
        lambda: nn.Conv2d(3, 4, kernel_size=3),
    ),
    BadFirstCall(
        "linear-given-list",
        lambda: dnn.Linear(4),
        lambda: [[1.0, 2.0, 3.0]],
        di.InferenceError,
        r"Linear layer '0' cannot infer in_features .*expected a tensor as forward "
        r"argument 0, got a list",
        lambda: torch.randn(2, 3),
        lambda: nn.Linear(3, 4),
    ),
    BadFirstCall(
        "batchnorm1d-given-float",
        lambda: dnn.BatchNorm1d(),
        lambda: 3.0,
        di.InferenceError,
        r"BatchNorm1d layer '0' cannot infer num_features .*expected a tensor as forward "
        r"argument 0, got a float \(3\.0\)",
        lambda: torch.randn(4, 3),
        lambda: nn.BatchNorm1d(3),
    ),
    BadFirstCall(
        "groupnorm-given-indivisible-channels",
        lambda: dnn.GroupNorm(4),
        lambda: torch.randn(2, 6, 5),
        di.InferenceError,
        r"GroupNorm layer '0': GroupNorm could not be constructed with the sizes "
        r"\(inferred num_channels=6 from a float32 tensor of shape \(2, 6, 5\)\)",
        lambda: torch.randn(2, 8, 5),
        lambda: nn.GroupNorm(4, 8),
    ),
]


@pytest.mark.parametrize("case", BAD_FIRST_CALLS, ids=[case.id for case in BAD_FIRST_CALLS])
def test_bad_first_call_names_the_layer_and_leaves_it_deferred(
    case: BadFirstCall, assert_same_state: AssertSameState
) -> None:
    layer = case.deferred()
    net = nn.Sequential(layer)
    deferred_class = type(layer)
    text = repr(net)
    placeholders = net.state_dict(keep_vars=True)
    named = dict(net.named_parameters())

    with pytest.raises(case.error, match=case.match):
        net(case.bad())

    assert type(layer) is deferred_class
    assert net[0] is layer
    assert di.pending(net) == ["0"]
    assert repr(net) == text
    after = net.state_dict(keep_vars=True)
    assert list(after) == list(placeholders)
    for key, placeholder in placeholders.items():
        assert after[key] is placeholder, key
        assert isinstance(placeholder, UninitializedParameter | UninitializedBuffer), key
    assert all(p is named[n] for n, p in net.named_parameters())

    x = case.good()
    torch.manual_seed(0)  # a failed build may have drawn random numbers
    out = net(x)
    torch.manual_seed(0)
    ref = nn.Sequential(case.eager())
    assert type(layer) is type(ref[0])
    assert torch.equal(out, ref(x))
    assert_same_state(net, ref)
    assert all(p is named[n] for n, p in net.named_parameters())


def test_bad_first_call_of_a_standalone_layer_names_its_class() -> None:
    layer = dnn.Conv2d(6, kernel_size=5)
    with pytest.raises(
        di.InferenceError,
        match=r"^Conv2d layer cannot infer in_channels .*got a float32 tensor of shape \(5,\)",
    ):
        layer(torch.randn(5))
    assert not di.is_built(layer)


def test_layers_before_the_failing_one_stay_built() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Conv2d(4, kernel_size=3))
    first = net[0]
    with pytest.raises(
        di.InferenceError,
        match=r"Conv2d layer '2' cannot infer in_channels .*got a float32 tensor of shape \(2, 8\)",
    ):
        net(torch.randn(2, 5))
    assert net[0] is first and type(first) is nn.Linear and first.in_features == 5
    assert di.pending(net) == ["2"]
    assert not di.is_built(net)
    assert net[2](torch.randn(2, 8, 6, 6)).shape == (2, 4, 4, 4)
    assert di.is_built(net)


def test_error_family_derives_from_deferred_init_error_and_runtime_error() -> None:
    assert issubclass(di.DeferredInitError, RuntimeError)
    for error in (di.ShapeMismatchError, di.InferenceError, di.NotBuiltError):
        assert issubclass(error, di.DeferredInitError)


def test_torch_error_from_an_uninferred_dim_is_not_reported_as_mismatch() -> None:
    net = nn.Sequential(dnn.Conv2d(3, kernel_size=5))
    net(torch.randn(1, 2, 8, 8))
    with pytest.raises(RuntimeError, match=r"Kernel size can't be greater") as info:
        net(torch.randn(1, 2, 2, 2))
    assert not isinstance(info.value, di.DeferredInitError)


def test_shape_mismatch_of_a_standalone_layer_says_what_it_was_built_for() -> None:
    layer = dnn.Linear(4)
    layer(torch.randn(2, 3))
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"^Linear layer was built for in_features=3 \(inferred from a float32 tensor of "
        r"shape \(2, 3\)\), but received a float32 tensor of shape \(2, 5\), which would need "
        r"in_features=5\. Fix: .*di\.reset",
    ):
        layer(torch.randn(2, 5))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: dnn.Linear(4, 5, 6, 7, 8), r"deferinit Linear: too many positional arguments"),
        (lambda: dnn.Linear(4, bogus=1), r"deferinit Linear: .*bogus"),
        (lambda: dnn.Linear(), r"deferinit Linear: .*out_features"),
    ],
    ids=["too-many", "unknown-keyword", "missing"],
)
def test_twin_with_bad_constructor_arguments_raises_type_error(
    make: Callable[[], nn.Module], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        make()


class Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


@pytest.mark.parametrize(
    ("cls", "rules", "match"),
    [
        (int, {"in_dim": di.dim(-1)}, r"di\.defer expects an nn\.Module class"),
        (Block, {}, r"di\.defer\(Block\) needs at least one rule"),
        (Block, {"width": di.dim(-1)}, r"'width' not a constructor argument of Block"),
        (Block, {"in_dim": 3}, r"a deferinit rule must be di\.dim"),
    ],
    ids=["not-a-module", "no-rules", "unknown-argument", "not-a-rule"],
)
def test_defer_rejects_bad_declarations_with_type_error(
    cls: Any, rules: dict[str, Any], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        di.defer(cls, **rules)


def _snapshot(module: nn.Module) -> tuple[Any, ...]:
    """Everything a failed first call must leave as it was: class, repr, and the very
    placeholder objects under every name."""
    tensors = module.state_dict(keep_vars=True)
    return type(module), repr(module), [(k, id(v)) for k, v in tensors.items()], tensors


def _assert_unchanged(module: nn.Module, before: tuple[Any, ...]) -> None:
    cls, text, ids, _ = before
    assert type(module) is cls
    assert repr(module) == text
    assert [(k, id(v)) for k, v in module.state_dict(keep_vars=True).items()] == ids


def test_multihead_attention_given_a_0d_key_names_the_layer_and_stays_deferred() -> None:
    layer = dnn.MultiheadAttention(num_heads=2)
    before = _snapshot(layer)
    q = torch.randn(5, 3, 8)
    with pytest.raises(
        di.InferenceError,
        match=r"^MultiheadAttention layer cannot infer kdim .*expected key with at least 1 "
        r"dimension, got a float32 tensor of shape \(\)",
    ):
        layer(q, torch.tensor(1.0), q)
    _assert_unchanged(layer, before)
    assert layer(q, q, q)[0].shape == (5, 3, 8)


class _NoRepr:
    def __repr__(self) -> str:
        raise RuntimeError("this repr is broken")


def test_an_argument_whose_repr_raises_is_described_by_its_type() -> None:
    layer = dnn.Linear(4)
    with pytest.raises(
        di.InferenceError,
        match=r"^Linear layer cannot infer in_features .*expected a tensor as forward "
        r"argument 0, got a _NoRepr \(<_NoRepr object>\)",
    ):
        layer(_NoRepr())
    assert not di.is_built(layer)


class _CountedRepr(float):
    calls = 0

    def __repr__(self) -> str:
        type(self).calls += 1
        return super().__repr__()


def test_a_huge_list_as_first_input_fails_fast_with_a_bounded_message() -> None:
    huge = [_CountedRepr(0.5)] * 10**6
    layer = dnn.Linear(4)
    with pytest.raises(di.InferenceError, match=r"got a list of 1000000 items \(\[0\.5, ") as info:
        layer(huge)
    assert _CountedRepr.calls <= 10  # never the repr of the whole list (that took seconds)
    assert len(str(info.value)) < 400
    assert not di.is_built(layer)


class _Sum(nn.Module):
    """Reduces its input to a 0-d tensor: no layer after it can infer anything."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_inference_error_names_a_later_layer_of_a_repeated_class() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(8), _Sum(), dnn.Linear(8))
    with pytest.raises(
        di.InferenceError,
        match=r"^Linear layer '4' cannot infer in_features .*got a float32 tensor of shape \(\)",
    ):
        net(torch.randn(2, 5))
    assert di.pending(net) == ["4"]


def test_shape_mismatch_names_a_later_layer_of_a_repeated_class() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(8), nn.ReLU(), dnn.Linear(8))
    net(torch.randn(2, 5))
    # Only the width reaching layer '4' changes: layers '0' and '2' still fit.
    net[3] = nn.Linear(8, 6)
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"^Linear layer '4' was built for in_features=8 \(inferred from a float32 tensor "
        r"of shape \(2, 8\)\), but received a float32 tensor of shape \(2, 6\), which would "
        r"need in_features=6\.",
    ):
        net(torch.randn(2, 5))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = dnn.Linear(8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> Any:
        return self.act(self.proj(x))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Encoder()
        self.head = dnn.Linear(2)

    def forward(self, x: torch.Tensor) -> Any:
        return self.head(self.encoder(x))


def test_shape_mismatch_names_a_later_block_of_a_nested_model() -> None:
    model = _Model()
    model(torch.randn(2, 5))
    model.encoder.layers[0].act = nn.Linear(8, 3)  # only encoder.layers.1.proj now misfits
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"^Linear layer 'encoder\.layers\.1\.proj' was built for in_features=8 .*"
        r"received a float32 tensor of shape \(2, 3\)",
    ):
        model(torch.randn(2, 5))


def test_inference_error_names_a_later_block_of_a_nested_model() -> None:
    model = _Model()
    model.encoder.layers[1].act = _Sum()
    with pytest.raises(
        di.InferenceError, match=r"^Linear layer 'encoder\.layers\.2\.proj' cannot infer"
    ):
        model(torch.randn(2, 5))
    assert di.pending(model) == ["encoder.layers.2.proj", "head"]


def _nested(x: Any, layout: torch.layout) -> Any:
    """A nested tensor with the same trailing sizes: two samples whose first
    (ragged) dimension differs; ``torch.jagged``, or torch's older ``torch.strided``
    layout (which has no ``.shape``)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        return x
    parts = [x[0].contiguous(), x[0][: max(1, x.shape[1] - 1)].contiguous()]
    return torch.nested.nested_tensor(parts, layout=layout)


def _flat(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_nested:
        return tuple(value.unbind())
    if isinstance(value, tuple):
        return tuple(_flat(v) for v in value)
    return value


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided], ids=["jagged", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in layers.CASES])
def test_nested_tensor_builds_as_eager_does_or_leaves_the_layer_unchanged(
    case: layers.Case, training: bool, layout: torch.layout
) -> None:
    args = tuple(_nested(a, layout) for a in case.inputs())
    good = case.inputs()
    torch.manual_seed(0)
    want: Any = None
    try:
        with torch.no_grad():
            want = _flat(layers.eager(case).train(training)(*args))
    except Exception as error:  # eager torch rejects it: deferinit may say so its own way
        eager_error: type[Exception] | None = type(error)
    else:
        eager_error = None
    torch.manual_seed(0)
    layer = layers.twin(case).train(training)
    before = _snapshot(layer)
    try:
        with torch.no_grad():
            got = _flat(layer(*args))
    except di.DeferredInitError:
        assert eager_error is not None
        _assert_unchanged(layer, before)
        layer(*good)  # a corrected call then builds
        return
    except Exception as error:  # torch's own error: only where eager raises it too
        assert type(error) is eager_error
        _assert_unchanged(layer, before)
        return
    assert eager_error is None
    layers.assert_same(got, want)
