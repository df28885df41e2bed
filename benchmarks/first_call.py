"""Construct + first forward of three models: deferinit vs eager vs ``torch.nn.Lazy*``.

The MLP and LeNet of ``construct_first_forward.py`` and a ResNet-style CNN (d2l's
residual blocks: 3x3 convolutions with batch norm, a 1x1 convolution where the
shape changes; a 7x7 stem, two stages of two blocks, 32 and 64 channels, global
average pooling, ``Linear(10)``; input ``(1, 1, 64, 64)``), each written three
ways: ``eager`` (every size written out), ``deferinit`` (``deferinit.nn`` twins,
sizes inferred) and ``Lazy`` (``torch.nn.LazyLinear`` / ``LazyConv2d`` /
``LazyBatchNorm2d``). One sample is "construct the model and run its first
forward", CPU, one thread. Two regimes:

- ``steady``: in this process after a warm-up (deferinit's per-(class, arguments)
  layout cache is warm); interleaved rounds, the variants' order alternating; one
  sample is the mean of ``reps`` constructions; median of the rounds.
- ``first use``: the first construction in a fresh interpreter. One subprocess per
  sample imports torch, deferinit and this script (imports not timed), collects the
  garbage the imports left, then times one construct + first forward; the variants'
  subprocesses alternate; median.

Run: ``.venv/bin/python benchmarks/first_call.py`` (``--quick`` for a smoke run);
``benchmarks/run.py`` reads the same functions.
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
import torch.nn.functional as F  # noqa: N812 - torch's convention
from construct_first_forward import MODELS as SMALL_MODELS
from construct_first_forward import VARIANTS
from torch import nn

from deferinit import nn as dnn

BAR = 1.5


def _conv(
    variant: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0
) -> nn.Module:
    if variant == "eager":
        return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    if variant == "deferinit":
        return dnn.Conv2d(cout, kernel, stride=stride, padding=padding)
    return nn.LazyConv2d(cout, kernel, stride=stride, padding=padding)


def _norm(variant: str, channels: int) -> nn.Module:
    if variant == "eager":
        return nn.BatchNorm2d(channels)
    if variant == "deferinit":
        return dnn.BatchNorm2d()
    return nn.LazyBatchNorm2d()


def _linear(variant: str, fin: int, fout: int) -> nn.Module:
    if variant == "eager":
        return nn.Linear(fin, fout)
    if variant == "deferinit":
        return dnn.Linear(fout)
    return nn.LazyLinear(fout)


class Residual(nn.Module):
    """d2l's residual block."""

    def __init__(self, variant: str, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(variant, cin, cout, 3, padding=1, stride=stride)
        self.bn1 = _norm(variant, cout)
        self.conv2 = _conv(variant, cout, cout, 3, padding=1)
        self.bn2 = _norm(variant, cout)
        self.conv3 = _conv(variant, cin, cout, 1, stride=stride) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        return F.relu(y + x)


def resnet(variant: str) -> nn.Module:
    return nn.Sequential(
        _conv(variant, 1, 32, 7, stride=2, padding=3),
        _norm(variant, 32),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        Residual(variant, 32, 32),
        Residual(variant, 32, 32),
        Residual(variant, 32, 64, stride=2),
        Residual(variant, 64, 64),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        _linear(variant, 64, 10),
    )


MODELS: dict[str, tuple[Callable[[str], nn.Module], tuple[int, ...]]] = {
    **SMALL_MODELS,
    "ResNet": (resnet, (1, 1, 64, 64)),
}


# Constructions per steady sample: a sample of each model lasts a few milliseconds.
REPS = {"MLP": 40, "LeNet": 20, "ResNet": 4}


def construct_and_run(model: str, variant: str, x: torch.Tensor) -> float:
    """Seconds to construct ``model`` written as ``variant`` and run its first forward."""
    factory = MODELS[model][0]
    start = time.perf_counter()
    factory(variant)(x)
    return time.perf_counter() - start


def steady(model: str, *, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds of construct + first forward of each variant, in this process."""
    x = torch.randn(MODELS[model][1])
    with warnings.catch_warnings():  # torch < 2.5 warns that lazy modules are new
        warnings.simplefilter("ignore", UserWarning)
        for variant in VARIANTS:  # warm-up: the layout cache, torch's first-call paths
            construct_and_run(model, variant, x)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                gc.collect()
                runs = [construct_and_run(model, variant, x) for _ in range(reps)]
                samples[variant].append(sum(runs) / reps)
    return {v: statistics.median(s) for v, s in samples.items()}


def first_use(model: str, *, reps: int) -> dict[str, float]:
    """Median seconds of construct + first forward of each variant in fresh interpreters."""
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(reps):
        for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            command = [sys.executable, "-W", "ignore", __file__, "--child", model, variant]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            samples[variant].append(float(done.stdout.split()[-1]))
    return {v: statistics.median(s) for v, s in samples.items()}


def _child(model: str, variant: str) -> None:
    torch.set_num_threads(1)
    x = torch.randn(MODELS[model][1])
    # The imports leave young objects by the hundred thousand; collected now, not by
    # whichever variant's allocations happen to tip the collector's count inside the
    # timed call (a 1 ms pause, when the modules load from .pyc files).
    gc.collect()
    print(f"{construct_and_run(model, variant, x):.9f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    rounds, scale, first_reps = (3, 0.1, 1) if args.quick else (9, 1.0, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {
            (m, regime): cells
            for m in MODELS
            for regime, cells in (
                ("steady", steady(m, rounds=rounds, reps=max(1, int(REPS[m] * scale)))),
                ("first use", first_use(m, reps=first_reps)),
            )
        }
    finally:
        torch.set_num_threads(threads)
    print(f"construct + first forward, CPU, 1 thread, torch {torch.__version__}")
    for (model, regime), cells in results.items():
        eager = cells["eager"]
        ratio, lazy = cells["deferinit"] / eager, cells["Lazy"] / eager
        verdict = "met" if ratio <= min(BAR, lazy) else "missed"
        print(
            f"ratio deferinit/eager ({model}, {regime}): {ratio:.2f}  "
            f"(Lazy/eager {lazy:.2f}; bar <= {BAR} and <= Lazy: {verdict}; "
            f"eager {eager * 1e6:.0f} us)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
