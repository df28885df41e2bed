"""Shape-only build of a 70-billion-parameter transformer on ``meta`` (docs/design.md §5).

The model is ``examples/llama_70b_meta.py``'s Llama-3-70B-shaped decoder (80
blocks of deferred ``dnn.Linear`` / ``dnn.RMSNorm``, 70.6e9 parameters). Each
sample is a fresh interpreter that imports torch, deferinit and the example
(not timed), then times construct + ``di.build(model, tokens, device="meta")``.
The peak memory is the child's peak resident set (``ru_maxrss`` of its
``os.wait4`` resource usage): the whole process, torch's import included.
Median over samples. Bars: < 10 s and < 1 GiB.

Run: ``.venv/bin/python benchmarks/meta_build.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "llama_70b_meta.py"
BAR_SECONDS, BAR_MIB = 10.0, 1024.0


def sample(layers: int) -> tuple[float, float]:
    """(seconds to construct and build, peak resident MiB) in a fresh interpreter."""
    command = [sys.executable, "-W", "ignore", __file__, "--child", str(layers)]
    # Not subprocess.run: its wait gives no resource usage of this one child.
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        assert child.stdout is not None
        out = child.stdout.read()
        child.stdout.close()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{err.read()[-3000:]}")
    peak_kib = usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return float(out.split()[-1]), peak_kib / 1024


def measure(*, layers: int = 80, reps: int = 3) -> tuple[float, float]:
    """Median (seconds, peak MiB) over ``reps`` fresh interpreters."""
    samples = [sample(layers) for _ in range(reps)]
    return statistics.median(s for s, _ in samples), statistics.median(m for _, m in samples)


def _child(layers: int) -> None:
    import torch  # noqa: PLC0415 - the parent never needs torch

    import deferinit as di  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("llama_70b_meta", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclass looks itself up there
    spec.loader.exec_module(example)
    start = time.perf_counter()
    model = example.Llama(example.Config(n_layers=layers))
    di.build(model, torch.empty(1, 16, dtype=torch.long, device="meta"), device="meta")
    elapsed = time.perf_counter() - start
    assert di.is_built(model)
    print(f"{elapsed:.9f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="fresh interpreters (median)")
    parser.add_argument("--quick", action="store_true", help="2 blocks, one sample")
    parser.add_argument("--child", type=int, metavar="LAYERS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child)
        return 0
    layers, reps = (2, 1) if args.quick else (80, args.reps)
    seconds, mib = measure(layers=layers, reps=reps)
    print(f"Llama-3-70B-shaped decoder, {layers} blocks, di.build on meta, median of {reps}")
    print(f"ratio seconds / bar: {seconds / BAR_SECONDS:.2f}  ({seconds:.2f} s, bar < 10 s)")
    print(f"ratio peak MiB / bar: {mib / BAR_MIB:.2f}  ({mib:.0f} MiB, bar < 1 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
