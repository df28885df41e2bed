"""A deferred model, built from a shape, then compiled and exported like any torch model.

``di.build`` turns every deferred layer into the exact ``torch.nn`` layer (here
``nn.Linear`` and ``nn.LayerNorm``), so what comes out is an ordinary model:
``torch.compile(fullgraph=True)`` traces it without a graph break, and
``torch.export`` captures it whole, with a dynamic batch dimension, and
``torch.onnx.export`` writes it as an ONNX model (needs ``onnx`` and ``onnxscript``,
both in the ``dev`` extra; skipped with a note when they are missing). Each is
checked against the eager model; the ONNX model runs in onnx's reference evaluator.

Run: ``python examples/compile_and_export.py`` — prints one ``... matches eager: True``
line per check and exits with status 1 if any check fails. Compiling takes a few
seconds on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

FEATURES = 20
BATCHES = (8, 3)


def make_model() -> nn.Module:
    """An MLP without input sizes: 20 features in, 10 out, sizes inferred."""
    return nn.Sequential(dnn.Linear(64), dnn.LayerNorm(), nn.GELU(), dnn.Linear(10))


def matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    # Inductor may fuse and reorder float operations: equal up to rounding.
    return torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = di.build(make_model(), (BATCHES[0], FEATURES))
    print(model)
    print(f"built: {di.is_built(model)}")
    inputs = [torch.randn(b, FEATURES) for b in BATCHES]
    with torch.no_grad():
        eager = [model(x) for x in inputs]

    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        compiled_ok = all(matches(compiled(x), y) for x, y in zip(inputs, eager, strict=True))
    print(f"compile: {time.perf_counter() - start:.1f} s")
    print(f"compiled (fullgraph) matches eager: {compiled_ok} (batches {BATCHES})")

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (inputs[0],), dynamic_shapes=({0: batch},))
    exported = program.module()
    with torch.no_grad():
        exported_ok = all(torch.equal(exported(x), y) for x, y in zip(inputs, eager, strict=True))
    print(f"exported parameters: {', '.join(program.state_dict)}")
    print(f"exported matches eager: {exported_ok} (batches {BATCHES})")

    onnx_ok = check_onnx(model, inputs[0], eager[0])
    return 0 if compiled_ok and exported_ok and onnx_ok else 1


def check_onnx(model: nn.Module, x: torch.Tensor, want: torch.Tensor) -> bool:
    """Export to ONNX and run it in onnx's pure-numpy reference evaluator."""
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        print("onnx: skipped (pip install onnx onnxscript)")
        return True
    import onnx  # noqa: PLC0415 - optional dependency
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

    program = torch.onnx.export(model.eval(), (x,), dynamo=True, verbose=False)
    assert program is not None
    proto = program.model_proto
    onnx.checker.check_model(proto)
    (got,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    ok = matches(torch.from_numpy(got), want)
    print(f"onnx nodes: {', '.join(node.op_type for node in proto.graph.node)}")
    print(f"onnx matches eager: {ok}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
