"""Compilers (docs/design.md §3.9): ``torch.compile`` before and after build, ``torch.export``
and ONNX export after build, each against the eager model with its sizes written out.

Under the same seed a deferred model holds bitwise the eager model's parameters
(§3.3), so a compiled or exported deferred model must compute what the eager one
computes: bitwise where the same kernels run (``torch.export``, ``aot_eager``),
within float rounding where inductor generates its own (``torch.testing.assert_close``
with ``rtol=atol=1e-6``; the MLP here comes out bitwise on x86 CPUs).

Compiling is slow on a small CPU, so the models are tiny and there are only three
``torch.compile`` calls, one model each (about 3-5 s each with inductor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

Factory = Callable[[], nn.Module]

# Importing inductor (the default torch.compile backend) imports torch.utils.mkldnn,
# whose module body uses the deprecated torch.jit.script_method: torch warns about
# its own code, once per process, at the first torch.compile. Nothing of ours.
INDUCTOR_IMPORT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
# torch.onnx's decomposition step deep-copies pytree specs, and copying a LeafSpec
# trips torch's own deprecation of isinstance(spec, LeafSpec) (torch 2.13).
ONNX_LEAFSPEC_WARNING = r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"

# At a graph break Dynamo probes ``hasattr(t, "grad")`` on the activations it hands
# back to Python (here the ReLU output passed to a layer that builds eagerly); for a
# non-leaf tensor that warns, and torch hides the warning with a showwarning filter
# (torch._logging._internal.safe_grad_filter), which a warnings-as-errors run bypasses.
DYNAMO_GRAPH_BREAK_WARNING = (
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"
)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """Equal up to float rounding: inductor may fuse or reorder a reduction."""
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


# --- models: deferred, and eager with the sizes written out ------------------------------


def deferred_mlp() -> nn.Module:
    return nn.Sequential(dnn.Linear(16), nn.ReLU(), dnn.Linear(3))


def eager_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


MLP_SHAPE = (4, 5)


def deferred_convnet() -> nn.Module:
    return nn.Sequential(
        dnn.Conv2d(4, kernel_size=3, padding=1),
        dnn.BatchNorm2d(),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        dnn.Linear(8),
        dnn.LayerNorm(),
        nn.Sigmoid(),
        dnn.Linear(3),
    )


def eager_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Sigmoid(),
        nn.Linear(8, 3),
    )


CONVNET_SHAPE = (2, 2, 8, 8)


class Attention(nn.Module):
    """Linear -> MultiheadAttention -> TransformerEncoderLayer -> Linear, batch first."""

    def __init__(self, deferred: bool) -> None:
        super().__init__()
        self.embed: nn.Module
        self.attn: nn.Module
        self.encoder: nn.Module
        if deferred:
            self.embed = dnn.Linear(8)
            self.attn = dnn.MultiheadAttention(num_heads=2, batch_first=True)
            self.encoder = dnn.TransformerEncoderLayer(
                nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
            )
            self.head: nn.Module = dnn.Linear(3)
        else:
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
            self.encoder = nn.TransformerEncoderLayer(
                8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
            )
            self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6) -> (B, T, 3)
        h = self.embed(x)
        h, _ = self.attn(h, h, h)
        return self.head(self.encoder(h))  # type: ignore[no-any-return]


ATTENTION_SHAPE = (2, 5, 6)

CASES: dict[str, tuple[Factory, Factory, tuple[int, ...]]] = {
    "mlp": (deferred_mlp, eager_mlp, MLP_SHAPE),
    "convnet-batchnorm": (deferred_convnet, eager_convnet, CONVNET_SHAPE),
    "attention": (lambda: Attention(True), lambda: Attention(False), ATTENTION_SHAPE),
}


def pair(name: str, *, built: bool = True) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(deferred model, eager twin, example shape) under the same seed; the deferred
    one built with ``di.build`` unless ``built=False``."""
    deferred, eager, shape = CASES[name]
    torch.manual_seed(0)
    model = deferred()
    if built:
        di.build(model, shape)
    torch.manual_seed(0)
    return model, eager(), shape


def inputs(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    return torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(batch))


def assert_same_parameters(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch: no cache entries or recompile counts carried over."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- torch.compile ----------------------------------------------------------------------


@pytest.mark.filterwarnings(INDUCTOR_IMPORT_WARNING)
@pytest.mark.filterwarnings(DYNAMO_GRAPH_BREAK_WARNING)
def test_compile_before_the_first_forward_builds_and_equals_eager() -> None:
    model, eager, shape = pair("mlp", built=False)
    compiled = torch.compile(model)

    x = inputs(shape, 4)
    torch.manual_seed(0)  # the build draws its initial values now, as eager's did at seed 0
    out = compiled(x)

    # The compiled call built the model, with the eager model's parameters (§3.3).
    assert di.is_built(model)
    assert type(model.get_submodule("0")) is nn.Linear
    assert_same_parameters(model, eager)
    assert_close(out, eager(x))
    # Later calls run the built model, other batch sizes included.
    x7 = inputs(shape, 7)
    assert_close(compiled(x7), eager(x7))


@pytest.mark.filterwarnings(INDUCTOR_IMPORT_WARNING)
def test_compile_fullgraph_after_build_equals_eager_forward_and_backward() -> None:
    model, eager, shape = pair("mlp")
    # fullgraph: the guarded forward of a built layer causes no graph break.
    compiled = torch.compile(model, fullgraph=True, dynamic=True)

    for batch in (4, 9):  # dynamic=True: one compile serves every batch size
        x = inputs(shape, batch)
        out, want = compiled(x), eager(x)
        assert_close(out, want)
        model.zero_grad()
        eager.zero_grad()
        out.square().sum().backward()
        want.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            assert_close(p.grad, q.grad, name)


def test_compile_fullgraph_after_build_tracks_batchnorm_statistics_bitwise() -> None:
    # aot_eager runs the traced graph with eager's kernels, so everything is bitwise,
    # including the running statistics the training-mode forward updates in place.
    model, eager, shape = pair("convnet-batchnorm")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    x = inputs(shape, 2)
    out, want = compiled(x), eager(x)
    assert torch.equal(out, want)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert torch.equal(p.grad, q.grad), name
    assert_same_parameters(model, eager)  # running_mean/var/num_batches_tracked too
    assert int(model.get_buffer("1.num_batches_tracked")) == 1


# --- torch.export -----------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_after_build_runs_like_eager(name: str, training: bool) -> None:
    model, eager, shape = pair(name)
    model.train(training)
    eager.train(training)
    x = inputs(shape, shape[0])

    program = torch.export.export(model, (x,))

    # The program holds the built model's parameters and buffers under the eager names.
    assert sorted(program.state_dict) == sorted(model.state_dict())
    exported = program.module()
    assert torch.equal(exported(x), eager(x))
    assert_same_parameters(exported, eager)  # incl. the statistics a training forward updates


def test_export_after_build_with_a_dynamic_batch_dimension() -> None:
    model, eager, shape = pair("mlp")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (inputs(shape, 4),), dynamic_shapes=({0: batch},))
    exported = program.module()
    for n in (1, 4, 13):
        x = inputs(shape, n)
        assert torch.equal(exported(x), eager(x)), n


def test_export_after_meta_build_and_materialize_runs_like_eager() -> None:
    deferred, eager_factory, shape = CASES["convnet-batchnorm"]
    model = di.build(deferred(), torch.empty(shape, device="meta"), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    eager = eager_factory().eval()
    model.eval()
    x = inputs(shape, 3)
    program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), eager(x))


# --- ONNX -------------------------------------------------------------------------------


@pytest.mark.filterwarnings(ONNX_LEAFSPEC_WARNING)
@pytest.mark.parametrize("name", ["mlp", "convnet-batchnorm"])
def test_onnx_export_after_build_runs_like_eager(name: str) -> None:
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
    pytest.importorskip(
        "onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (dev extra)"
    )
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415 - optional dependency

    model, eager, shape = pair(name)
    model.eval()  # inference export; torch.onnx warns about exporting in training mode
    eager.eval()
    x = inputs(shape, shape[0])

    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)

    assert program is not None
    proto = program.model_proto
    onnx.checker.check_model(proto)
    # Evaluated by onnx's pure-numpy reference runtime: no onnxruntime needed.
    (got,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    assert_close(torch.from_numpy(got), eager(x).detach())
