"""``di.materialize`` throughput vs eager construction of the same model (docs/design.md §5).

Two models, CPU, one thread: ``mlp`` (8 × ``Linear(2048, 2048)`` with ReLU, 33.6 M
parameters) and ``transformer`` (4 × ``TransformerEncoderLayer(512, 8, 2048)``,
12.6 M parameters). For each, side by side in one run, median of ``--repeat``
interleaved rounds:

* ``eager``: construct the model with its sizes written out (allocation and
  initialization, what a user waits for without deferinit);
* ``materialize``: ``di.materialize`` of the same model written with deferred
  layers and built on meta beforehand (the build is timed apart: it allocates
  nothing and is paid once per model, not per materialization);
* ``materialize seed=``: the same with ``seed=0`` (every parameter on its own
  generator).

Throughput ratio = eager seconds / materialize seconds (bar: ≥ 1.0). Prints a
table and the ratios; exits 0 whether or not the bar is met.

Run: ``.venv/bin/python benchmarks/materialize_throughput.py`` (``--quick``: smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

BAR = 1.0


def mlp(width: int, depth: int, *, deferred: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [dnn.Linear(width) if deferred else nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def transformer(width: int, depth: int, *, deferred: bool) -> nn.Module:
    def layer() -> nn.Module:
        if deferred:
            return dnn.TransformerEncoderLayer(nhead=8, dim_feedforward=4 * width)
        return nn.TransformerEncoderLayer(width, 8, 4 * width)

    return nn.Sequential(*(layer() for _ in range(depth)))


Factory = Callable[..., nn.Module]


def timed(run: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(factory: Factory, width: int, depth: int, repeat: int) -> dict[str, float]:
    example = (2, width)
    samples: dict[str, list[float]] = {"eager": [], "materialize": [], "seed": [], "build": []}
    for _ in range(repeat):
        samples["eager"].append(timed(lambda: factory(width, depth, deferred=False)))
        seeds: tuple[tuple[str, int | None], ...] = (("materialize", None), ("seed", 0))
        for variant, seed in seeds:
            start = time.perf_counter()
            model = di.build(factory(width, depth, deferred=True), example, device="meta")
            samples["build"].append(time.perf_counter() - start)
            gc.collect()
            start = time.perf_counter()
            di.materialize(model, seed=seed)
            samples[variant].append(time.perf_counter() - start)
            del model
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    cases: list[tuple[str, Factory, int, int]] = [
        ("mlp", mlp, 2048, 8),
        ("transformer", transformer, 512, 4),
    ]
    if args.quick:
        cases = [("mlp", mlp, 64, 2), ("transformer", transformer, 32, 1)]
    repeat = 1 if args.quick else args.repeat

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(f"CPU, 1 thread, median of {repeat}; seconds")
        print(f"{'model':<12} {'eager':>8} {'materialize':>12} {'seed=':>8} {'(build)':>8}")
        ratios = []
        for name, factory, width, depth in cases:
            m = measure(factory, width, depth, repeat)
            print(
                f"{name:<12} {m['eager']:8.4f} {m['materialize']:12.4f} {m['seed']:8.4f} "
                f"{m['build']:8.4f}"
            )
            ratios.append((name, m["eager"] / m["materialize"], m["eager"] / m["seed"]))
        for name, plain, seeded in ratios:
            met = "met" if plain >= BAR else "missed"
            print(f"ratio {name} throughput materialize / eager: {plain:.2f} (bar ≥ {BAR}: {met})")
            print(f"ratio {name} throughput materialize seed= / eager: {seeded:.2f}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
