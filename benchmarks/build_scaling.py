"""Build time of an N-layer deferinit model, against N (docs/design.md §5).

The model is ``nn.Sequential`` of N ``dnn.Linear(16)`` layers (``--relu``: a ReLU
after each), fed a ``(2, 16)`` input, CPU, one thread. For each N the script times
the construction and the first forward (the build: every layer infers its size,
constructs its ``nn.Linear`` and becomes it), and the same two phases of the
eager model (``nn.Linear(16, 16)`` layers) for comparison. A model's figure is the
median of ``--repeat`` runs; the garbage collector stays on, as for users.

Bars: linear in N (per-layer time at the largest N within 1.5x of the smallest
N's), and construct + build of 10,000 layers in < 3 s. Prints a table and the
ratios; the exit code is 0 whether or not the bars are met.

Run: ``.venv/bin/python benchmarks/build_scaling.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
from torch import nn

from deferinit import nn as dnn

BAR_SECONDS, BAR_LAYERS = 3.0, 10_000
LINEAR_BAR = 1.5
WIDTH = 16


def model(n: int, *, deferred: bool, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers.append(dnn.Linear(WIDTH) if deferred else nn.Linear(WIDTH, WIDTH))
        if relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def construct_and_build(n: int, *, deferred: bool, relu: bool) -> tuple[float, float]:
    """Seconds to construct the N-layer model and to run its first forward."""
    x = torch.randn(2, WIDTH)
    gc.collect()
    start = time.perf_counter()
    net = model(n, deferred=deferred, relu=relu)
    built = time.perf_counter()
    net(x)
    end = time.perf_counter()
    del net
    gc.collect()
    return built - start, end - built


def measure(n: int, *, relu: bool, repeat: int) -> dict[str, tuple[float, float]]:
    """Median (construct, first forward) seconds of the deferinit and eager models."""
    samples: dict[str, list[tuple[float, float]]] = {"deferinit": [], "eager": []}
    for r in range(repeat):
        for name in ("deferinit", "eager") if r % 2 == 0 else ("eager", "deferinit"):
            samples[name].append(construct_and_build(n, deferred=name == "deferinit", relu=relu))
    return {
        name: (statistics.median(c for c, _ in s), statistics.median(f for _, f in s))
        for name, s in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, nargs="+", default=[100, 1000, 10_000], help="values of N"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per N (median)")
    parser.add_argument("--relu", action="store_true", help="a ReLU after every Linear")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (N = 10, 100)")
    args = parser.parse_args(argv)
    sizes, repeat = ([10, 100], 1) if args.quick else (sorted(args.layers), args.repeat)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        construct_and_build(10, deferred=True, relu=args.relu)  # fills the layout cache
        results = {n: measure(n, relu=args.relu, repeat=repeat) for n in sizes}
    finally:
        torch.set_num_threads(threads)

    kind = f"Linear({WIDTH})" + (" + ReLU" if args.relu else "")
    print(
        f"build of nn.Sequential of N x {kind}, input (2, {WIDTH}), CPU, 1 thread, "
        f"median of {repeat} (torch {torch.__version__})"
    )
    print(
        f"{'N':>7}{'construct s':>13}{'build s':>10}{'total s':>10}{'us/layer':>10}"
        f"{'eager total s':>15}{'vs eager':>10}"
    )
    per_layer: dict[int, float] = {}
    for n, cells in results.items():
        total = sum(cells["deferinit"])
        eager = sum(cells["eager"])
        per_layer[n] = total / n
        construct, build = cells["deferinit"]
        print(
            f"{n:>7}{construct:>13.3f}{build:>10.3f}{total:>10.3f}{total / n * 1e6:>10.1f}"
            f"{eager:>15.3f}{total / eager:>10.2f}"
        )
    small, large = sizes[0], sizes[-1]
    growth = per_layer[large] / per_layer[small]
    verdict = "linear" if growth <= LINEAR_BAR else f"NOT linear (bar <= {LINEAR_BAR})"
    print(f"ratio per-layer time N={large} / N={small}: {growth:.2f}  ({verdict})")
    if BAR_LAYERS in results:
        seconds = sum(results[BAR_LAYERS]["deferinit"])
        met = "met" if seconds < BAR_SECONDS else f"MISSED by {seconds - BAR_SECONDS:.2f} s"
        print(f"{BAR_LAYERS} layers: construct + build {seconds:.2f} s  (bar < 3 s: {met})")
    if args.quick:
        print("(--quick: N too small for the bars; smoke run only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
