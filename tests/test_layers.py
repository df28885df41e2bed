"""Every twin in ``deferinit.nn`` against its eager ``torch.nn`` layer.

One table, read against ``deferinit.nn.TWINS``: each row gives torch's arguments,
the sizes the twin must infer, the inputs (batched and, where torch takes it,
unbatched), an input it cannot infer from, and an input whose inferred size
changed after build. Inputs are made *before* ``torch.manual_seed``: a deferred
layer draws its initialization at its first forward.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import deferinit as di
from deferinit import nn as dnn
from deferinit.nn import TWINS

Args = tuple[Any, ...]
AssertSameState = Callable[[nn.Module, nn.Module], None]


def r(*shape: int) -> torch.Tensor:
    return torch.randn(shape)


@dataclass(frozen=True)
class Case:
    id: str
    cls: type[nn.Module]
    kwargs: dict[str, Any]  # torch's own arguments, by torch's names
    inferred: dict[str, Any]  # what the twin must infer from `inputs`
    inputs: Callable[[], Args]
    unbatched: Callable[[], Args] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # deferinit's options (ndim=...)
    wrong: Callable[[], Args] | None = None  # nothing can be inferred from this
    wrong_match: str = ""  # ... and the error says so
    changed: Callable[[], Args] | None = None  # after build: an inferred size differs
    changed_arg: str = ""  # ... this one
    marks: tuple[Any, ...] = ()  # e.g. a warning torch itself gives eagerly too


def _rnn_cases(cls: type[nn.Module]) -> list[Case]:
    name = cls.__name__
    return [
        Case(
            name,
            cls,
            {"hidden_size": 4, "num_layers": 2},
            {"input_size": 6},
            lambda: (r(5, 3, 6),),
            unbatched=lambda: (r(5, 6),),
            wrong=lambda: (r(2, 5, 3, 6),),
            wrong_match="cannot infer input_size .*expected a 2-d or 3-d tensor",
            changed=lambda: (r(5, 3, 7),),
            changed_arg="input_size",
        ),
        Case(
            f"{name}-batch_first-bidirectional",
            cls,
            {"hidden_size": 4, "batch_first": True, "bidirectional": True},
            {"input_size": 6},
            lambda: (r(3, 5, 6),),
            unbatched=lambda: (r(5, 6),),
        ),
    ]


def _cell_case(cls: type[nn.Module]) -> Case:
    return Case(
        cls.__name__,
        cls,
        {"hidden_size": 4},
        {"input_size": 6},
        lambda: (r(3, 6),),
        unbatched=lambda: (r(6),),
        wrong=lambda: (r(2, 3, 6),),
        wrong_match="cannot infer input_size .*expected a 1-d or 2-d tensor",
        changed=lambda: (r(3, 5),),
        changed_arg="input_size",
    )


def _conv_cases(cls: type[nn.Module], n: int) -> list[Case]:
    spatial = (5, 4, 3)[:n]
    ranks = f"{n + 1}-d or {n + 2}-d"
    return [
        Case(
            cls.__name__,
            cls,
            {"out_channels": 4, "kernel_size": 2},
            {"in_channels": 3},
            lambda: (r(2, 3, *spatial),),
            unbatched=lambda: (r(3, *spatial),),
            wrong=lambda: (r(*spatial),),
            wrong_match=f"cannot infer in_channels .*expected a {ranks} tensor",
            changed=lambda: (r(2, 5, *spatial),),
            changed_arg="in_channels",
        ),
        Case(
            f"{cls.__name__}-options",
            cls,
            {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1},
            {"in_channels": 2},
            lambda: (r(2, 2, *spatial),),
        ),
    ]


def _instance_norm_case(cls: type[nn.Module], n: int) -> Case:
    spatial = (5, 4, 3)[:n]
    return Case(
        cls.__name__,
        cls,
        # affine: with parameters, torch itself rejects a changed channel size.
        {"affine": True, "track_running_stats": True},
        {"num_features": 3},
        lambda: (r(2, 3, *spatial),),
        unbatched=lambda: (r(3, *spatial),),
        wrong=lambda: (r(1, 2, 3, *spatial),),
        wrong_match=f"cannot infer num_features .*expected a {n + 1}-d or {n + 2}-d tensor",
        changed=lambda: (r(2, 4, *spatial),),
        changed_arg="num_features",
    )


def _batch_norm_case(cls: type[nn.Module], shape: tuple[int, ...], wrong: tuple[int, ...]) -> Case:
    changed = (shape[0], shape[1] + 2, *shape[2:])
    return Case(
        cls.__name__,
        cls,
        {"momentum": 0.3},
        {"num_features": shape[1]},
        lambda: (r(*shape),),
        wrong=lambda: (r(*wrong),),
        wrong_match="cannot infer num_features",
        changed=lambda: (r(*changed),),
        changed_arg="num_features",
    )


def _mha_self(*shape: int) -> Args:
    x = r(*shape)
    return (x, x, x)


def _transformer_cases(cls: type[nn.Module]) -> list[Case]:
    arg = "d_model"
    two = cls is nn.TransformerDecoderLayer  # forward(tgt, memory)

    def extra(*shape: int) -> Args:
        return (r(*shape),) if two else ()

    return [
        Case(
            cls.__name__,
            cls,
            {"nhead": 2, "dim_feedforward": 16, "dropout": 0.0},
            {arg: 8},
            lambda: (r(5, 3, 8), *extra(4, 3, 8)),
            unbatched=lambda: (r(5, 8), *extra(4, 8)),
            wrong=lambda: (r(8), *extra(8)),
            wrong_match="cannot infer d_model .*expected a 2-d or 3-d tensor",
            changed=lambda: (r(5, 3, 6), *extra(4, 3, 6)),
            changed_arg=arg,
        ),
        Case(
            f"{cls.__name__}-batch_first-norm_first",
            cls,
            {
                "nhead": 4,
                "dim_feedforward": 16,
                "dropout": 0.0,
                "batch_first": True,
                "norm_first": True,
            },
            {arg: 8},
            lambda: (r(3, 5, 8), *extra(3, 4, 8)),
            unbatched=lambda: (r(5, 8), *extra(4, 8)),
        ),
    ]


def _full_transformer_cases() -> list[Case]:
    # batch_first: torch warns at the construction of a sequence-first nn.Transformer
    # (no nested-tensor fast path), and this table constructs at collection;
    # tests/test_twin_coverage.py covers sequence-first inputs.
    small = {"nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 16}
    return [
        Case(
            "Transformer",
            nn.Transformer,
            {**small, "dropout": 0.0, "batch_first": True},
            {"d_model": 8},
            lambda: (r(3, 5, 8), r(3, 4, 8)),
            unbatched=lambda: (r(5, 8), r(4, 8)),
            wrong=lambda: (r(8), r(8)),
            wrong_match="cannot infer d_model .*expected a 2-d or 3-d tensor",
            changed=lambda: (r(3, 5, 6), r(3, 4, 6)),
            changed_arg="d_model",
        ),
    ]


CASES: list[Case] = [
    Case(
        "Linear",
        nn.Linear,
        {"out_features": 4},
        {"in_features": 6},
        lambda: (r(3, 6),),
        unbatched=lambda: (r(6),),
        wrong=lambda: (r(),),
        wrong_match="cannot infer in_features .*at least 1 dimension",
        changed=lambda: (r(3, 5),),
        changed_arg="in_features",
    ),
    Case("Linear-3d", nn.Linear, {"out_features": 4}, {"in_features": 6}, lambda: (r(2, 3, 6),)),
    Case(
        "Bilinear",
        nn.Bilinear,
        {"out_features": 4},
        {"in1_features": 3, "in2_features": 5},
        lambda: (r(2, 3), r(2, 5)),
        unbatched=lambda: (r(3), r(5)),
        wrong=lambda: (r(2, 3),),
        wrong_match="cannot infer in2_features .*forward argument 1",
        changed=lambda: (r(2, 4), r(2, 5)),
        changed_arg="in1_features",
    ),
    *_conv_cases(nn.Conv1d, 1),
    *_conv_cases(nn.Conv2d, 2),
    *_conv_cases(nn.Conv3d, 3),
    *_conv_cases(nn.ConvTranspose1d, 1),
    *_conv_cases(nn.ConvTranspose2d, 2),
    *_conv_cases(nn.ConvTranspose3d, 3),
    _batch_norm_case(nn.BatchNorm1d, (4, 3), wrong=(2, 3, 4, 5)),
    Case("BatchNorm1d-3d", nn.BatchNorm1d, {}, {"num_features": 3}, lambda: (r(4, 3, 5),)),
    _batch_norm_case(nn.BatchNorm2d, (2, 3, 4, 4), wrong=(2, 3, 4)),
    _batch_norm_case(nn.BatchNorm3d, (2, 3, 2, 3, 2), wrong=(2, 3, 4, 4)),
    _batch_norm_case(nn.SyncBatchNorm, (4, 3, 5), wrong=(3,)),
    _instance_norm_case(nn.InstanceNorm1d, 1),
    _instance_norm_case(nn.InstanceNorm2d, 2),
    _instance_norm_case(nn.InstanceNorm3d, 3),
    Case(
        "InstanceNorm2d-default",
        nn.InstanceNorm2d,
        {},
        {"num_features": 3},
        lambda: (r(2, 3, 4, 4),),
    ),
    Case(
        "GroupNorm",
        nn.GroupNorm,
        {"num_groups": 2},
        {"num_channels": 6},
        lambda: (r(2, 6, 5),),
        wrong=lambda: (r(6),),
        wrong_match="cannot infer num_channels .*at least 2 dimension",
        changed=lambda: (r(2, 4, 5),),
        changed_arg="num_channels",
    ),
    Case(
        "LayerNorm",
        nn.LayerNorm,
        {},
        {"normalized_shape": (5,)},
        lambda: (r(2, 3, 5),),
        unbatched=lambda: (r(5),),
        wrong=lambda: (r(),),
        wrong_match="cannot infer normalized_shape .*at least 1 dimension",
        changed=lambda: (r(2, 3, 4),),
        changed_arg="normalized_shape",
    ),
    Case(
        "LayerNorm-ndim2",
        nn.LayerNorm,
        {"eps": 1e-3},
        {"normalized_shape": (3, 5)},
        lambda: (r(2, 3, 5),),
        options={"ndim": 2},
        wrong=lambda: (r(5),),
        wrong_match=r"cannot infer normalized_shape .*at least 2 dimension\(s\) \(ndim=2\)",
        changed=lambda: (r(2, 4, 5),),
        changed_arg="normalized_shape",
    ),
    Case(
        "RMSNorm",
        nn.RMSNorm,
        {},
        {"normalized_shape": (5,)},
        lambda: (r(2, 3, 5),),
        unbatched=lambda: (r(5),),
        wrong=lambda: (r(),),
        wrong_match="cannot infer normalized_shape",
        changed=lambda: (r(2, 3, 4),),
        changed_arg="normalized_shape",
    ),
    Case(
        "RMSNorm-ndim2",
        nn.RMSNorm,
        {"eps": 1e-6},
        {"normalized_shape": (3, 5)},
        lambda: (r(2, 3, 5),),
        options={"ndim": 2},
        wrong=lambda: (r(5),),
        wrong_match=r"cannot infer normalized_shape .*\(ndim=2\)",
    ),
    Case("PReLU", nn.PReLU, {}, {}, lambda: (r(2, 3, 4),), unbatched=lambda: (r(4),)),
    Case(
        "PReLU-per_channel",
        nn.PReLU,
        {"init": 0.1},
        {"num_parameters": 3},
        lambda: (r(2, 3, 4),),
        options={"per_channel": True},
        wrong=lambda: (r(2, 0, 4),),
        wrong_match="cannot infer num_parameters .*non-zero channel size",
        changed=lambda: (r(2, 5, 4),),
        changed_arg="num_parameters",
    ),
    *_rnn_cases(nn.RNN),
    *_rnn_cases(nn.LSTM),
    *_rnn_cases(nn.GRU),
    Case(
        "LSTM-proj_size",
        nn.LSTM,
        {"hidden_size": 6, "proj_size": 2},
        {"input_size": 3},
        lambda: (r(5, 2, 3),),
        marks=(pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning"),),
    ),
    _cell_case(nn.RNNCell),
    _cell_case(nn.LSTMCell),
    _cell_case(nn.GRUCell),
    Case(
        "MultiheadAttention",
        nn.MultiheadAttention,
        {"num_heads": 2},
        {"embed_dim": 8, "kdim": None, "vdim": None},
        lambda: _mha_self(5, 3, 8),
        unbatched=lambda: _mha_self(5, 8),
        wrong=lambda: _mha_self(2, 5, 3, 8),
        wrong_match="cannot infer embed_dim .*expected a 2-d or 3-d tensor",
        changed=lambda: _mha_self(5, 3, 6),
        changed_arg="embed_dim",
    ),
    Case(
        "MultiheadAttention-kdim-vdim-batch_first",
        nn.MultiheadAttention,
        {"num_heads": 2, "batch_first": True},
        {"embed_dim": 8, "kdim": 6, "vdim": 10},
        lambda: (r(3, 5, 8), r(3, 4, 6), r(3, 4, 10)),
        unbatched=lambda: (r(5, 8), r(4, 6), r(4, 10)),
        changed=lambda: (r(3, 5, 8), r(3, 4, 7), r(3, 4, 10)),
        changed_arg="kdim",
    ),
    Case(
        "MultiheadAttention-vdim-only",
        nn.MultiheadAttention,
        {"num_heads": 4, "bias": False},
        {"embed_dim": 8, "kdim": None, "vdim": 3},
        lambda: (r(5, 2, 8), r(4, 2, 8), r(4, 2, 3)),
    ),
    *_transformer_cases(nn.TransformerEncoderLayer),
    *_transformer_cases(nn.TransformerDecoderLayer),
    *_full_transformer_cases(),
    Case(
        "AdaptiveLogSoftmaxWithLoss",
        nn.AdaptiveLogSoftmaxWithLoss,
        {"n_classes": 10, "cutoffs": [4, 8], "div_value": 2.0},
        {"in_features": 6},
        lambda: (r(5, 6), torch.tensor([0, 3, 5, 9, 7])),
        unbatched=lambda: (r(6), torch.tensor(8)),
        wrong=lambda: (r(2, 5, 6), torch.tensor([1, 2])),
        wrong_match="cannot infer in_features .*expected a 1-d or 2-d tensor",
        changed=lambda: (r(5, 7), torch.tensor([0, 3, 5, 9, 7])),
        changed_arg="in_features",
    ),
]


def twin(case: Case) -> nn.Module:
    """The deferred layer of a case: torch's arguments minus the inferred ones."""
    made: nn.Module = getattr(dnn, case.cls.__name__)(**case.kwargs, **case.options)
    return made


def eager(case: Case) -> nn.Module:
    return case.cls(**case.inferred, **case.kwargs)


def assert_same(got: object, want: object) -> None:
    """Bitwise-equal outputs: tensors, tuples (named ones, PackedSequence) and None."""
    assert type(got) is type(want)
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    else:
        assert got == want


def _param(case: Case, batched: bool) -> Any:
    kind = "batched" if batched else "unbatched"
    return pytest.param(case, batched, id=f"{case.id}-{kind}", marks=case.marks)


EQUIVALENCE = [_param(c, True) for c in CASES] + [_param(c, False) for c in CASES if c.unbatched]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


WRONG = [c for c in CASES if c.wrong is not None]
CHANGED = [c for c in CASES if c.changed is not None]
WRONG_PARAMS = [pytest.param(c, id=c.id, marks=c.marks) for c in WRONG]
CHANGED_PARAMS = [pytest.param(c, id=c.id, marks=c.marks) for c in CHANGED]


def test_every_twin_has_a_case() -> None:
    assert {c.cls for c in CASES} == set(TWINS)
    assert len(_ids(CASES)) == len(set(_ids(CASES)))
    for cls in TWINS:
        assert cls.__name__ in dnn.__all__


def test_every_inferring_twin_has_a_wrong_input_and_a_changed_input() -> None:
    inferring = {c.cls for c in CASES if c.inferred}
    assert {c.cls for c in WRONG} == inferring
    assert {c.cls for c in CHANGED} == inferring


@pytest.mark.parametrize(("case", "batched"), EQUIVALENCE)
def test_deferred_layer_equals_eager_bitwise(
    case: Case, batched: bool, assert_same_state: AssertSameState
) -> None:
    make_inputs = case.inputs if batched else case.unbatched
    assert make_inputs is not None
    args = make_inputs()  # before the seed: the deferred layer draws its init at forward
    torch.manual_seed(0)
    layer = twin(case)
    if case.inferred:
        assert isinstance(layer, di.Deferred)
        assert "?" in repr(layer)
    out = layer(*args)
    torch.manual_seed(0)
    reference = eager(case)
    expected = reference(*args)

    assert type(layer) is case.cls
    assert repr(layer) == repr(reference)
    assert di.is_built(layer)
    assert_same_state(layer, reference)
    assert_same(out, expected)


@pytest.mark.parametrize("case", WRONG_PARAMS)
def test_uninferable_input_raises_inference_error_and_leaves_layer_deferred(case: Case) -> None:
    assert case.wrong is not None
    layer = twin(case)
    before = repr(layer)
    placeholders = [id(p) for p in layer.parameters()]
    with pytest.raises(di.InferenceError, match=rf"{case.cls.__name__} layer .*{case.wrong_match}"):
        layer(*case.wrong())
    assert isinstance(layer, di.Deferred)
    assert repr(layer) == before
    assert [id(p) for p in layer.parameters()] == placeholders
    layer(*case.inputs())  # a corrected call then succeeds
    assert type(layer) is case.cls


@pytest.mark.parametrize("case", CHANGED_PARAMS)
def test_changed_inferred_size_after_build_raises_shape_mismatch(case: Case) -> None:
    assert case.changed is not None
    layer = twin(case)
    args = case.inputs()
    layer(*args)
    was = re.escape(f"{case.changed_arg}={case.inferred[case.changed_arg]!r}")
    pattern = (
        rf"{case.cls.__name__} layer was built for {was} .*which would need "
        rf"{case.changed_arg}=.*di\.reset"
    )
    with pytest.raises(di.ShapeMismatchError, match=pattern):
        layer(*case.changed())
    assert type(layer) is case.cls
    layer(*args)  # still the built layer, unchanged


# --- arguments: torch's names, positions and defaults ------------------------


POSITIONAL: list[tuple[str, Callable[[], nn.Module], Args, Callable[[], nn.Module]]] = [
    ("Conv2d", lambda: dnn.Conv2d(8, 3), (r(1, 4, 6, 6),), lambda: nn.Conv2d(4, 8, 3)),
    ("Linear", lambda: dnn.Linear(8), (r(2, 5),), lambda: nn.Linear(5, 8)),
    ("Bilinear", lambda: dnn.Bilinear(7), (r(2, 3), r(2, 4)), lambda: nn.Bilinear(3, 4, 7)),
    ("LSTM", lambda: dnn.LSTM(16, 2), (r(3, 2, 5),), lambda: nn.LSTM(5, 16, 2)),
    ("GRUCell", lambda: dnn.GRUCell(6, False), (r(2, 3),), lambda: nn.GRUCell(3, 6, False)),
    ("GroupNorm", lambda: dnn.GroupNorm(2), (r(2, 6, 3),), lambda: nn.GroupNorm(2, 6)),
    (
        "BatchNorm2d",
        lambda: dnn.BatchNorm2d(1e-3, 0.5),
        (r(2, 3, 2, 2),),
        lambda: nn.BatchNorm2d(3, 1e-3, 0.5),
    ),
    (
        "MultiheadAttention",
        lambda: dnn.MultiheadAttention(4),
        _mha_self(2, 1, 8),
        lambda: nn.MultiheadAttention(8, 4),
    ),
    (
        "TransformerEncoderLayer",
        lambda: dnn.TransformerEncoderLayer(2, 16, 0.0),
        (r(2, 1, 4),),
        lambda: nn.TransformerEncoderLayer(4, 2, 16, 0.0),
    ),
    (
        "AdaptiveLogSoftmaxWithLoss",
        lambda: dnn.AdaptiveLogSoftmaxWithLoss(10, [4]),
        (r(2, 8), torch.tensor([1, 9])),
        lambda: nn.AdaptiveLogSoftmaxWithLoss(8, 10, [4]),
    ),
]


@pytest.mark.parametrize(
    ("deferred", "args", "expected"), [pytest.param(*p[1:], id=p[0]) for p in POSITIONAL]
)
def test_positional_arguments_skip_inferred_ones_and_keep_torch_defaults(
    deferred: Callable[[], nn.Module],
    args: Args,
    expected: Callable[[], nn.Module],
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(1)
    layer = deferred()
    out = layer(*args)
    torch.manual_seed(1)
    reference = expected()
    assert_same(out, reference(*args))
    assert type(layer) is type(reference)
    assert repr(layer) == repr(reference)
    assert_same_state(layer, reference)


def test_conv2d_reads_out_channels_then_kernel_size() -> None:
    layer = dnn.Conv2d(8, 3)
    assert repr(layer) == "Conv2d(?, 8, kernel_size=(3, 3), stride=(1, 1))"
    layer(r(1, 4, 6, 6))
    assert isinstance(layer, nn.Conv2d)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (4, 8, (3, 3))
    assert (layer.stride, layer.padding, layer.dilation, layer.groups) == (
        (1, 1),
        (0, 0),
        (1, 1),
        1,
    )
    assert layer.padding_mode == "zeros" and layer.bias is not None


def test_inferred_argument_given_by_keyword_builds_at_once(
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(2)
    layer: nn.Module = dnn.Linear(8, in_features=5)
    torch.manual_seed(2)
    reference = nn.Linear(5, 8)
    assert type(layer) is nn.Linear
    assert_same_state(layer, reference)
    with pytest.raises(
        di.ShapeMismatchError, match=r"Linear layer was constructed with in_features=5"
    ):
        layer(r(2, 6))


def test_unknown_argument_raises_type_error_naming_torch_signature() -> None:
    with pytest.raises(TypeError, match=r"deferinit Linear: .*torch\.nn\.Linear.*in_features"):
        dnn.Linear(8, bogus=1)


NO_BIAS: list[tuple[type[nn.Module], dict[str, Any], dict[str, Any], Args]] = [
    (nn.Linear, {"out_features": 4}, {"in_features": 3}, (r(2, 3),)),
    (nn.Bilinear, {"out_features": 4}, {"in1_features": 3, "in2_features": 5}, (r(2, 3), r(2, 5))),
    (nn.Conv1d, {"out_channels": 4, "kernel_size": 2}, {"in_channels": 3}, (r(2, 3, 5),)),
    (nn.Conv2d, {"out_channels": 4, "kernel_size": 2}, {"in_channels": 3}, (r(2, 3, 5, 5),)),
    (
        nn.ConvTranspose2d,
        {"out_channels": 4, "kernel_size": 2},
        {"in_channels": 3},
        (r(2, 3, 5, 5),),
    ),
    (nn.LayerNorm, {}, {"normalized_shape": (5,)}, (r(2, 3, 5),)),
    (nn.GroupNorm, {"num_groups": 1}, {"num_channels": 3}, (r(2, 3, 5),)),
    (nn.MultiheadAttention, {"num_heads": 2}, {"embed_dim": 8}, _mha_self(5, 2, 8)),
    (
        nn.TransformerEncoderLayer,
        {"nhead": 2, "dim_feedforward": 16, "dropout": 0.0},
        {"d_model": 8},
        (r(5, 2, 8),),
    ),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "inferred", "args"), [pytest.param(*p, id=p[0].__name__) for p in NO_BIAS]
)
def test_bias_false_is_accepted_and_builds_without_bias(
    cls: type[nn.Module],
    kwargs: dict[str, Any],
    inferred: dict[str, Any],
    args: Args,
    assert_same_state: AssertSameState,
) -> None:
    torch.manual_seed(4)
    layer = getattr(dnn, cls.__name__)(**kwargs, bias=False)
    assert "bias=False" in repr(layer)
    assert not any(name.endswith("bias") for name, _ in layer.named_parameters())
    out = layer(*args)
    torch.manual_seed(4)
    reference = cls(**inferred, **kwargs, bias=False)
    assert type(layer) is cls
    assert repr(layer) == repr(reference)
    assert_same_state(layer, reference)
    assert_same(out, reference(*args))


# --- layer-specific inference ---------------------------------------------------


def test_prelu_default_has_one_parameter_and_builds_at_once() -> None:
    layer: nn.Module = dnn.PReLU()
    assert type(layer) is nn.PReLU
    assert layer.num_parameters == 1
    assert [p.shape for p in layer.parameters()] == [torch.Size([1])]
    assert repr(layer) == repr(nn.PReLU())


def test_prelu_per_channel_infers_channel_axis() -> None:
    layer: nn.Module = dnn.PReLU(per_channel=True)
    assert repr(layer) == "PReLU(num_parameters=?)"
    layer(r(2, 5, 3))
    assert type(layer) is nn.PReLU
    assert layer.num_parameters == 5
    assert layer.weight.shape == (5,)


def test_group_norm_infers_num_channels_from_num_groups() -> None:
    layer = dnn.GroupNorm(3)
    assert repr(layer).startswith("GroupNorm(3, ?, eps=1e-05")
    layer(r(2, 6, 4))
    assert isinstance(layer, nn.GroupNorm)
    assert (layer.num_groups, layer.num_channels) == (3, 6)


def test_group_norm_channels_not_divisible_by_groups_is_inference_error() -> None:
    layer = dnn.GroupNorm(4)
    with pytest.raises(di.InferenceError, match=r"GroupNorm layer.*num_channels=6"):
        layer(r(2, 6, 4))
    assert isinstance(layer, di.Deferred)


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.RMSNorm], ids=["LayerNorm", "RMSNorm"])
def test_norm_with_ndim_2_normalizes_last_two_dims(cls: type[nn.Module]) -> None:
    layer = getattr(dnn, cls.__name__)(ndim=2)
    assert "(?, ?)" in repr(layer)
    layer(r(4, 3, 5))
    assert type(layer) is cls
    assert layer.normalized_shape == (3, 5)
    assert layer.weight.shape == (3, 5)


def test_multihead_attention_infers_kdim_and_vdim_from_key_and_value() -> None:
    layer = dnn.MultiheadAttention(2)
    assert repr(layer) == "MultiheadAttention(embed_dim=?, num_heads=2, kdim=?, vdim=?)"
    layer(r(5, 3, 8), r(4, 3, 6), r(4, 3, 10))
    assert isinstance(layer, nn.MultiheadAttention)
    assert (layer.embed_dim, layer.kdim, layer.vdim) == (8, 6, 10)
    assert not layer._qkv_same_embed_dim
    assert layer.k_proj_weight is not None and layer.k_proj_weight.shape == (8, 6)
    assert layer.v_proj_weight is not None and layer.v_proj_weight.shape == (8, 10)


def test_multihead_attention_called_by_keyword_infers_from_query() -> None:
    layer = dnn.MultiheadAttention(2, batch_first=True)
    q = r(3, 5, 8)
    out, _ = layer(query=q, key=q, value=q)
    assert isinstance(layer, nn.MultiheadAttention)
    assert (layer.embed_dim, layer.kdim, layer.vdim) == (8, 8, 8)
    assert layer._qkv_same_embed_dim
    assert out.shape == (3, 5, 8)


def test_lstm_infers_input_size_from_packed_sequence(assert_same_state: AssertSameState) -> None:
    data = r(5, 3, 6)
    packed = pack_padded_sequence(data, torch.tensor([5, 3, 2]))
    torch.manual_seed(3)
    layer: nn.Module = dnn.LSTM(4, 2)
    out, (h, c) = layer(packed)
    torch.manual_seed(3)
    reference = nn.LSTM(6, 4, 2)
    want, (want_h, want_c) = reference(packed)
    assert type(layer) is nn.LSTM
    assert layer.input_size == 6
    assert_same_state(layer, reference)
    assert_same((out, (h, c)), (want, (want_h, want_c)))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=["RNN", "LSTM", "GRU"])
def test_recurrent_batch_first_reads_features_from_last_axis(cls: type[nn.Module]) -> None:
    layer = getattr(dnn, cls.__name__)(4, batch_first=True)
    out, _ = layer(r(2, 7, 3))  # (N, L, H_in)
    assert type(layer) is cls
    assert layer.input_size == 3 and layer.batch_first
    assert out.shape == (2, 7, 4)


def test_deferred_layer_in_sequential_names_its_index_in_errors() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Conv1d(2, 1))
    with pytest.raises(di.InferenceError, match=r"Conv1d layer '2' cannot infer in_channels"):
        net(r(4))
    assert type(net[0]) is nn.Linear  # built before the failing layer, as eager would be
    assert isinstance(net[2], di.Deferred)


# MultiheadAttention names its input projections by data: ``in_proj_weight`` when
# key and value have the query's size, else ``q/k/v_proj_weight``. Before the first
# input no placeholder can know which, so these cases are left out of the key and
# optimizer tests (a documented limit, docs/decisions.md); giving kdim/vdim
# explicitly restores both, as the test after them pins down.
KNOWN_NAMES = [
    c for c in CASES if c.inferred.get("kdim") is None and c.inferred.get("vdim") is None
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in KNOWN_NAMES])
def test_state_dict_keys_before_build_equal_eager(case: Case) -> None:
    layer = twin(case)
    reference = eager(case)
    assert list(layer.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in layer.named_parameters()] == [n for n, _ in reference.named_parameters()]


def _has_parameters(case: Case) -> bool:
    with torch.device("meta"):
        return any(True for _ in eager(case).parameters())


WITH_PARAMETERS = [c for c in KNOWN_NAMES if _has_parameters(c)]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in WITH_PARAMETERS])
def test_optimizer_made_before_build_holds_every_built_parameter(case: Case) -> None:
    layer = twin(case)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(*case.inputs())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in layer.named_parameters() if id(p) not in held]
    assert missing == []


def test_attention_with_explicit_kdim_vdim_keeps_keys_and_placeholders_before_build() -> None:
    layer = dnn.MultiheadAttention(num_heads=2, kdim=6, vdim=10, batch_first=True)
    keys = list(layer.state_dict())
    before = list(layer.parameters())
    q, k, v = r(3, 5, 8), r(3, 4, 6), r(3, 4, 10)
    torch.manual_seed(0)
    out, _ = layer(q, k, v)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2, kdim=6, vdim=10, batch_first=True)
    assert keys == list(reference.state_dict())
    assert [id(p) for p in layer.parameters()] == [id(p) for p in before]
    assert torch.equal(out, reference(q, k, v)[0])


@pytest.mark.parametrize("cls", list(TWINS), ids=[c.__name__ for c in TWINS])
def test_twin_signature_is_torchs_minus_the_inferred_arguments(cls: type[nn.Module]) -> None:
    twin_cls = getattr(dnn, cls.__name__)
    shown = inspect.signature(twin_cls).parameters
    torch_names = list(twin_cls._di_init_signature.parameters)
    assert list(shown) == [n for n in torch_names if n not in TWINS[cls]]
    for name in twin_cls._di_options:  # deferinit's keywords, not torch's arguments
        assert name not in shown


def test_linear_signature_reads_like_torchs() -> None:
    assert str(inspect.signature(dnn.Linear)) == (
        "(out_features: int, bias: bool = True, device=None, dtype=None) -> None"
    )
    layer = dnn.Linear(3)
    assert inspect.signature(layer) == inspect.signature(nn.Linear(2, 3))  # the instance: its call


@pytest.mark.parametrize("cls", list(TWINS), ids=[c.__name__ for c in TWINS])
def test_twin_docstring_says_which_axis_of_which_input_each_size_comes_from(
    cls: type[nn.Module],
) -> None:
    doc = getattr(dnn, cls.__name__).__doc__
    forward = list(inspect.signature(cls.forward).parameters)[1:]
    for name, rule in TWINS[cls].items():
        if isinstance(rule, di.dim):
            arg = rule.arg if isinstance(rule.arg, str) else forward[rule.arg]
            source = f"``{arg}.shape[{rule.axis}]``"
        else:
            source = rule.origin(_forward_signature(cls))
        assert f"    {name}: inferred from {source}" in doc, (name, doc)
    assert f"becomes a ``torch.nn.{cls.__name__}``" in doc


def _forward_signature(cls: type[nn.Module]) -> inspect.Signature:
    sig = inspect.signature(cls.forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def test_linear_docstring_says_in_features_comes_from_the_last_axis_of_input() -> None:
    assert "in_features: inferred from ``input.shape[-1]``" in (dnn.Linear.__doc__ or "")
    assert "embed_dim: inferred from ``query.shape[-1]``" in (dnn.MultiheadAttention.__doc__ or "")


def _twin_rules() -> list[di.Rule]:
    return [rule for rules in TWINS.values() for rule in rules.values()]


@pytest.mark.parametrize("rule", _twin_rules(), ids=repr)
def test_twin_rules_are_frozen_values_equal_to_a_fresh_copy(rule: di.Rule) -> None:
    assert dataclasses.is_dataclass(rule)
    fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}
    twin = type(rule)(**fields)
    assert twin == rule and hash(twin) == hash(rule) and repr(twin) == repr(rule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.extra = 1  # type: ignore[attr-defined]


def test_twin_rules_are_defined_beside_the_twins_in_nn() -> None:
    own = {type(r) for r in _twin_rules()} - {di.dim}
    assert own and {cls.__module__ for cls in own} == {"deferinit.nn"}
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("deferinit._nn_rules")
