"""Construct + first forward: deferinit vs eager vs ``torch.nn.Lazy*`` (docs/design.md §5).

Two models, each written three ways:

- ``MLP``: 20 -> 256 -> ReLU -> 10, input batch 64;
- ``LeNet``: d2l's LeNet-5 (Conv2d 6@5x5 pad 2, Sigmoid, AvgPool, Conv2d 16@5x5,
  Sigmoid, AvgPool, Flatten, Linear 120, 84, 10), input ``(1, 1, 28, 28)``;

as ``eager`` (``torch.nn`` with every size written out), ``deferinit``
(``deferinit.nn`` twins, sizes inferred) and ``Lazy`` (``torch.nn.LazyLinear`` /
``LazyConv2d``). One measurement is "construct the model and run the first
forward" (the forward that builds a deferred model), CPU, one thread.

Two regimes:

- ``steady``: in this process, after warm-up, interleaved rounds; median. A deferinit
  layer learns its parameter layout once per (class, arguments) and caches it, so
  this is what the second and later constructions of a model cost.
- ``first``: the first construction in a fresh interpreter (torch and deferinit
  imported, nothing else run; the layout cache is empty and torch's own first-call
  paths are cold for every variant alike); one subprocess per measurement, median.

The bar is deferinit/eager <= 1.5 (torch's Lazy modules are about 2x). Prints a
table and the ratios; the exit code is 0 whether or not the bar is met.

Run: ``.venv/bin/python benchmarks/construct_first_forward.py`` (``--quick`` for a
smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from deferinit import nn as dnn

BAR = 1.5
VARIANTS = ("eager", "deferinit", "Lazy")


def mlp(variant: str) -> nn.Module:
    if variant == "eager":
        return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    if variant == "deferinit":
        return nn.Sequential(dnn.Linear(256), nn.ReLU(), dnn.Linear(10))
    return nn.Sequential(nn.LazyLinear(256), nn.ReLU(), nn.LazyLinear(10))


def lenet(variant: str) -> nn.Module:
    conv1: nn.Module
    conv2: nn.Module
    fc: list[nn.Module]
    if variant == "eager":
        conv1, conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        fc = [nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)]
    elif variant == "deferinit":
        conv1, conv2 = dnn.Conv2d(6, 5, padding=2), dnn.Conv2d(16, 5)
        fc = [dnn.Linear(120), dnn.Linear(84), dnn.Linear(10)]
    else:
        conv1, conv2 = nn.LazyConv2d(6, 5, padding=2), nn.LazyConv2d(16, 5)
        fc = [nn.LazyLinear(120), nn.LazyLinear(84), nn.LazyLinear(10)]
    return nn.Sequential(
        conv1,
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        conv2,
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Flatten(),
        fc[0],
        nn.Sigmoid(),
        fc[1],
        nn.Sigmoid(),
        fc[2],
    )


MODELS: dict[str, tuple[Callable[[str], nn.Module], tuple[int, ...]]] = {
    "MLP": (mlp, (64, 20)),
    "LeNet": (lenet, (1, 1, 28, 28)),
}


Phases = tuple[float, float]  # seconds: construct, first forward


def construct_and_run(model: str, variant: str, x: torch.Tensor) -> Phases:
    """Seconds to construct ``model`` written as ``variant``, and to run its first forward."""
    factory = MODELS[model][0]
    start = time.perf_counter()
    net = factory(variant)
    built = time.perf_counter()
    net(x)
    return built - start, time.perf_counter() - built


def _medians(samples: dict[str, list[Phases]]) -> dict[str, Phases]:
    return {
        v: (statistics.median(c for c, _ in s), statistics.median(f for _, f in s))
        for v, s in samples.items()
    }


def steady(model: str, *, rounds: int, reps: int) -> dict[str, Phases]:
    """Median seconds of each phase, in this (warm) process."""
    x = torch.randn(MODELS[model][1])
    for variant in VARIANTS:  # warm-up: fills the layout cache and torch's first-call paths
        construct_and_run(model, variant, x)
    samples: dict[str, list[Phases]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            gc.collect()
            runs = [construct_and_run(model, variant, x) for _ in range(reps)]
            samples[variant].append(
                (sum(c for c, _ in runs) / reps, sum(f for _, f in runs) / reps)
            )
    return _medians(samples)


def first(model: str, *, reps: int) -> dict[str, Phases]:
    """Median seconds of each phase, the first time in a fresh interpreter."""
    samples: dict[str, list[Phases]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            command = [sys.executable, "-W", "ignore", __file__, "--child", model, variant]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            construct, forward = done.stdout.split()[-2:]
            samples[variant].append((float(construct), float(forward)))
    return _medians(samples)


def child(model: str, variant: str) -> None:
    """In a fresh interpreter: time one construct + first forward, print the seconds."""
    x = torch.randn(MODELS[model][1])
    gc.collect()  # the imports' garbage: not left to land in the timed call (first_call.py)
    construct, forward = construct_and_run(model, variant, x)
    print(f"{construct:.9f} {forward:.9f}")


def _table(title: str, results: dict[str, dict[str, Phases]]) -> None:
    print(title)
    head = f"{'construct us':>14}{'1st fwd us':>12}{'total us':>10}{'vs eager':>10}"
    print(f"{'model':<8}{'variant':<11}{head}")
    for model, cells in results.items():
        eager = sum(cells["eager"])
        for variant, (construct, forward) in cells.items():
            total = construct + forward
            print(
                f"{model:<8}{variant:<11}{construct * 1e6:>14.1f}{forward * 1e6:>12.1f}"
                f"{total * 1e6:>10.1f}{total / eager:>10.2f}"
            )


def _ratios(regime: str, results: dict[str, dict[str, Phases]]) -> None:
    for model, cells in results.items():
        eager = sum(cells["eager"])
        ratio, lazy = sum(cells["deferinit"]) / eager, sum(cells["Lazy"]) / eager
        print(
            f"ratio deferinit/eager ({model}, {regime}): {ratio:.2f}  "
            f"(bar <= {BAR}: {_verdict(ratio)}; Lazy/eager {lazy:.2f})"
        )


def _verdict(ratio: float) -> str:
    return "met" if ratio <= BAR else f"MISSED by {ratio - BAR:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (steady)")
    parser.add_argument("--reps", type=int, default=40, help="constructions per round (steady)")
    parser.add_argument("--first-reps", type=int, default=5, help="fresh interpreters per cell")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # torch < 2.5 warns that lazy modules are new
            warnings.simplefilter("ignore", UserWarning)
            if args.child:
                child(*args.child)
                return 0
            rounds, reps = (3, 3) if args.quick else (args.rounds, args.reps)
            warm = {m: steady(m, rounds=rounds, reps=reps) for m in MODELS}
            # --quick: one fresh interpreter per variant, for the MLP only.
            cold_models = ["MLP"] if args.quick else list(MODELS)
            first_reps = 1 if args.quick else args.first_reps
            cold = {m: first(m, reps=first_reps) for m in cold_models}
    finally:
        torch.set_num_threads(threads)

    print(f"construct + first forward, CPU, 1 thread, torch {torch.__version__}")
    _table(f"steady (median of {rounds} rounds x {reps}):", warm)
    _table(f"first in a fresh interpreter (median of {first_reps}):", cold)
    _ratios("steady", warm)
    _ratios("first", cold)
    if args.quick:
        print("(--quick: too few repetitions for the ratios to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
