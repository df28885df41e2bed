"""di.build of models holding real recurrent layers (docs/design.md §4.3, §5).

d2l's recurrent language models put a real ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``
beside a deferred head. The shape-only pass runs such models on meta copies of
their real weights, and answers torch's recurrent kernels from their arguments'
shapes instead of unrolling them step by step: the model builds bitwise as eager,
the live layers are never touched, and torch's own checks and errors stand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deferinit as di
from deferinit import nn as dnn
from deferinit._shape._recurrent import RecurrentShapes

AssertSameState = Callable[[nn.Module, nn.Module], None]
VOCAB, HIDDEN = 28, 16
CELLS: dict[str, type[nn.Module]] = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


class RNNLM(nn.Module):
    """d2l's ``RNNLM``: one-hot inputs, a recurrent layer, a linear head per step."""

    def __init__(self, rnn: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.linear = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embs = F.one_hot(tokens.T, VOCAB).type(torch.float32)  # (T, B, V)
        outputs, _ = self.rnn(embs)
        out: torch.Tensor = self.linear(outputs)
        return out.swapaxes(0, 1)  # (B, T, V)


class Packed(nn.Module):
    """A recurrent layer on a packed batch of sequences of the given lengths, then
    a head on its packed output."""

    def __init__(self, rnn: nn.Module, head: nn.Module, lengths: list[int]) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = head
        self.lengths = lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        out, _ = self.rnn(packed)
        assert isinstance(out, PackedSequence)
        result: torch.Tensor = self.head(out.data)
        return result


class Select(nn.Module):
    """The output sequence of a recurrent layer, without its final state."""

    def forward(self, pair: tuple[torch.Tensor, Any]) -> torch.Tensor:
        return pair[0]


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_real_recurrent_layer_beside_a_deferred_head_builds_as_eager(
    cell: str, assert_same_state: AssertSameState
) -> None:
    x = tokens()
    torch.manual_seed(0)
    want = RNNLM(CELLS[cell](VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB))
    torch.manual_seed(0)
    got = di.build(RNNLM(CELLS[cell](VOCAB, HIDDEN), dnn.Linear(VOCAB)), x)
    assert type(got.linear) is nn.Linear
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


CONFIGS: list[dict[str, Any]] = [
    {"batch_first": True},
    {"bidirectional": True, "num_layers": 2},
    {"num_layers": 2, "dropout": 0.5, "bias": False},
]


@pytest.mark.parametrize(
    ("cell", "config"),
    [
        *itertools.product(CELLS, CONFIGS),
        ("LSTM", {"proj_size": 3, "bidirectional": True, "num_layers": 2}),
    ],
    ids=str,
)
@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
def test_every_recurrent_configuration_builds_as_eager(
    cell: str, config: dict[str, Any], assert_same_state: AssertSameState
) -> None:
    batch_first = config.get("batch_first", False)
    x = torch.randn((3, 5, 6) if batch_first else (5, 3, 6), generator=torch.Generator())

    class Model(nn.Module):
        def __init__(self, head: Callable[[], nn.Module]) -> None:
            super().__init__()
            self.rnn = CELLS[cell](6, 4, **config)
            self.head = head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            result: torch.Tensor = self.head(out)
            return result

    width = (3 if "proj_size" in config else 4) * (2 if config.get("bidirectional") else 1)
    torch.manual_seed(1)
    want = Model(lambda: nn.Linear(width, 2)).eval()
    torch.manual_seed(1)
    got = di.build(Model(lambda: dnn.Linear(2)).eval(), x)
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_sequences_through_a_real_recurrent_layer_build_as_eager(
    cell: str, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(2))
    lengths = [6, 2, 4]
    torch.manual_seed(3)
    want = Packed(CELLS[cell](5, 4, bidirectional=True), nn.Linear(8, 2), lengths)
    torch.manual_seed(3)
    got = Packed(CELLS[cell](5, 4, bidirectional=True), dnn.Linear(2), lengths)
    di.build(got, x)
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


@pytest.mark.parametrize("cell", list(CELLS))
def test_deferred_recurrent_layers_build_as_eager(
    cell: str, assert_same_state: AssertSameState
) -> None:
    x = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    want = nn.Sequential(CELLS[cell](6, 4, num_layers=2), Select(), nn.Linear(4, 3))
    torch.manual_seed(5)
    got = nn.Sequential(getattr(dnn, cell)(4, num_layers=2), Select(), dnn.Linear(3))
    di.build(got, x)
    assert type(got[0]) is CELLS[cell]
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


def test_the_shape_pass_runs_real_weights_on_meta_copies_and_leaves_them_alone() -> None:
    # Seen from inside the pass (a pre-hook the pass runs on its shadow): the
    # recurrent layer holds plain meta tensors, not FakeTensorMode's fakes, and its
    # input is a plain meta tensor. The live layer keeps its objects and values.
    x = tokens()
    live = nn.GRU(VOCAB, HIDDEN)
    model = RNNLM(live, dnn.Linear(VOCAB))
    weights = list(live.parameters())
    values = [w.detach().clone() for w in weights]
    flat = live._flat_weights
    flat_items = list(flat)
    seen: list[tuple[str, ...]] = []

    def look(module: nn.Module, args: tuple[Any, ...]) -> None:
        tensors = [*module.parameters(), args[0]]
        seen.append(tuple(f"{type(t).__name__}:{t.device.type}" for t in tensors))

    live.register_forward_pre_hook(look)
    di.build(model, x)
    assert seen == [("Parameter:meta",) * len(weights) + ("Tensor:meta",)]
    assert list(live.parameters()) == weights
    assert all(torch.equal(w, v) for w, v in zip(weights, values, strict=True))
    assert live._flat_weights is flat and list(flat) == flat_items
    assert all(w is not None and w.device.type == "cpu" for w in flat)


def test_tied_real_weights_stay_tied_and_build_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    class Tied(nn.Module):
        def __init__(self, head: Callable[[], nn.Module]) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.rnn = nn.LSTM(8, 8)
            self.out = nn.Linear(8, VOCAB, bias=False)
            self.out.weight = self.embed.weight
            self.head = head()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(self.embed(t))
            result: torch.Tensor = self.head(self.out(h))
            return result

    x = tokens()
    torch.manual_seed(6)
    want = Tied(lambda: nn.Linear(VOCAB, 2))
    torch.manual_seed(6)
    got = di.build(Tied(lambda: dnn.Linear(2)), x)
    assert got.out.weight is got.embed.weight
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


class OnesOnTheDefaultDevice(nn.Module):
    """A forward that makes a tensor on the default device: meta is not enough."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[-1])


def test_a_forward_meta_cannot_run_falls_back_and_builds_as_eager(
    assert_same_state: AssertSameState,
) -> None:
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(8)
    want = nn.Sequential(nn.GRU(3, 4), Select(), OnesOnTheDefaultDevice(), nn.Linear(4, 2))
    torch.manual_seed(8)
    got = nn.Sequential(nn.GRU(3, 4), Select(), OnesOnTheDefaultDevice(), dnn.Linear(2))
    seen: list[tuple[str, str]] = []

    def look(module: nn.Module, args: tuple[Any, ...]) -> None:
        weight = module.get_parameter("weight_ih_l0")
        seen.append((weight.device.type, type(args[0]).__name__))

    got[0].register_forward_pre_hook(look)
    di.build(got, x)
    # First on meta copies; then under FakeTensorMode, real weights unchanged.
    assert seen == [("meta", "Tensor"), ("cpu", "FakeTensor")]
    assert_same_state(got, want)
    assert torch.equal(got(x), want(x))


def test_a_meta_build_beside_a_dropout_rnn_draws_nothing() -> None:
    model = RNNLM(nn.LSTM(VOCAB, HIDDEN, num_layers=2, dropout=0.5), dnn.Linear(VOCAB))
    x = tokens()
    before = torch.get_rng_state()
    di.build(model, x, device="meta")
    assert torch.equal(torch.get_rng_state(), before)
    assert model.linear.weight.is_meta and model.linear.in_features == HIDDEN


# --- the recurrent kernels' shapes -------------------------------------------------------


class Ops(TorchDispatchMode):
    """Records the aten operators dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


STEP_OPS = {"addmm", "mm", "matmul", "linear", "sigmoid", "tanh", "relu"}


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=torch.float64)


def _meta_inputs(kind: str, cell: str, batch_first: bool, states: int, out: int) -> tuple[Any, ...]:
    """Inputs of a 2-layer recurrent layer of 4 features and 5 hidden units."""
    if kind == "unbatched":
        return (_meta(6, 4),)
    if kind == "packed":
        lengths = torch.tensor([6, 4, 2])
        return (pack_padded_sequence(_meta(6, 3, 4), lengths, enforce_sorted=False),)
    x = _meta(2, 6, 4) if batch_first else _meta(6, 2, 4)
    if kind == "batched":
        return (x,)
    h = _meta(states, 2, out)
    return (x, (h, _meta(states, 2, 5)) if cell == "LSTM" else h)


def _described(output: Any) -> list[Any]:
    return [
        (type(t).__name__, tuple(t.shape), t.stride(), t.dtype, t.device.type)
        if isinstance(t, torch.Tensor)
        else t
        for t in tree_leaves(output)
    ]


@pytest.mark.parametrize(
    ("cell", "batch_first", "bidirectional", "proj", "kind"),
    [
        c
        for c in itertools.product(
            CELLS, (False, True), (False, True), (0, 3), ("batched", "unbatched", "hx", "packed")
        )
        if not (c[3] and c[0] != "LSTM")
    ],
    ids=str,
)
@pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning")
def test_recurrent_kernels_are_answered_with_torch_s_shapes_without_a_step(
    cell: str, batch_first: bool, bidirectional: bool, proj: int, kind: str
) -> None:
    extra = {"proj_size": proj} if proj else {}
    layer = CELLS[cell](
        4,
        5,
        num_layers=2,
        batch_first=batch_first,
        bidirectional=bidirectional,
        device="meta",
        dtype=torch.float64,
        **extra,
    )
    states = 2 * (2 if bidirectional else 1)
    args = _meta_inputs(kind, cell, batch_first, states, proj or 5)
    want = layer(*args)  # torch's kernel, unrolled on meta
    ops = Ops()
    with RecurrentShapes(), ops:
        got = layer(*args)
    assert _described(got) == _described(want)
    assert not ops.names & STEP_OPS, ops.names


def _gru_call(**change: Any) -> tuple[Any, ...]:
    layer = nn.GRU(4, 5, device="meta")
    call: dict[str, Any] = {
        "input": torch.empty(3, 2, 4, device="meta"),
        "hx": torch.empty(1, 2, 5, device="meta"),
        "params": list(layer._flat_weights),
        "has_biases": True,
        "num_layers": 1,
        "dropout": 0.0,
        "train": False,
        "bidirectional": False,
        "batch_first": False,
    }
    call.update(change)
    return tuple(call.values())


@pytest.mark.parametrize(
    "change",
    [
        {"hx": torch.empty(1, 3, 5, device="meta")},  # another batch size
        {"input": torch.empty(3, 2, 6, device="meta")},  # another feature size
        {"num_layers": 2},  # fewer weights than layers
        {"input": torch.empty(3, 4, device="meta")},  # not 3-d
        {"input": torch.empty(0, 2, 4, device="meta")},  # no steps
        {"hx": torch.empty(1, 2, 5, device="meta", dtype=torch.float64)},  # another dtype
    ],
    ids=["batch", "features", "layers", "rank", "empty", "dtype"],
)
def test_calls_the_kernel_would_judge_go_to_the_kernel(change: dict[str, Any]) -> None:
    # Whatever torch's kernel does with such a call (its error, or an answer),
    # the call gives the same under RecurrentShapes.
    args = _gru_call(**change)

    def outcome(mode: bool) -> Any:
        try:
            if mode:
                with RecurrentShapes():
                    return _described(torch.gru(*args))
            return _described(torch.gru(*args))
        except Exception as error:  # noqa: BLE001 - compared below
            return (type(error), str(error))

    assert outcome(True) == outcome(False)
