"""Forward cost of a built deferinit model against the same eager model (docs/design.md §5).

The model is the MLP of the bar: 20 -> 256 -> ReLU -> 10, batch 64, CPU, one thread.
Four models with equal weights run side by side in one process:

- ``eager``: ``torch.nn`` layers with the sizes written out (the reference);
- ``deferinit``: ``deferinit.nn`` twins built by one forward; each built layer's
  ``forward`` is the mismatch guard (``deferinit._become._guard.Guard``);
- ``eager+pre-hook``: the eager model with a forward pre-hook on each Linear that
  checks the input size: the obvious way to get the same check, and why deferinit
  does not use it;
- ``LazyLinear``: ``torch.nn.LazyLinear`` after its first forward turned it into
  ``nn.Linear``.

Timing: every round times each model for ``--iters`` calls, the order alternating
between rounds; a model's figure is its median over rounds. Many short rounds
(150 x 200 calls) keep the four models' samples close in time, which matters on a
shared machine; ``LazyLinear`` runs the very same code as ``eager`` once
materialized, so its distance from 1.000 shows the noise of the run. Both inference
(``torch.no_grad``) and training-mode (autograd recording) forwards are measured;
the bar (<= 1.03x) is read on the no-grad forward, where the fixed per-call cost
weighs most. Prints a table and the ratio; the exit code is 0 whether or not the
bar is met.

Run: ``.venv/bin/python benchmarks/forward_overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from deferinit import nn as dnn

BAR = 1.03
IN, HIDDEN, OUT, BATCH = 20, 256, 10, 64

Model = Callable[[torch.Tensor], torch.Tensor]


def eager_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def deferinit_mlp(x: torch.Tensor) -> nn.Sequential:
    net = nn.Sequential(dnn.Linear(HIDDEN), nn.ReLU(), dnn.Linear(OUT))
    net(x)  # the build
    return net


def _check_size(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    if args[0].shape[-1] != module.in_features:
        raise RuntimeError(f"expected {module.in_features} features, got {args[0].shape[-1]}")


def hooked_mlp() -> nn.Sequential:
    net = eager_mlp()
    for layer in net:
        if isinstance(layer, nn.Linear):
            layer.register_forward_pre_hook(_check_size)
    return net


def lazy_mlp(x: torch.Tensor) -> nn.Sequential:
    with warnings.catch_warnings():  # torch < 2.5 warns that lazy modules are new
        warnings.simplefilter("ignore", UserWarning)
        net = nn.Sequential(nn.LazyLinear(HIDDEN), nn.ReLU(), nn.LazyLinear(OUT))
    net(x)  # materializes: the layers become nn.Linear and the hook is removed
    return net


def models(x: torch.Tensor) -> dict[str, nn.Sequential]:
    """The four models, with the eager model's weights copied into the others."""
    torch.manual_seed(0)
    eager = eager_mlp()
    built = {
        "eager": eager,
        "deferinit": deferinit_mlp(x),
        "eager+pre-hook": hooked_mlp(),
        "LazyLinear": lazy_mlp(x),
    }
    for name, net in built.items():
        net.load_state_dict(eager.state_dict())
        if not torch.equal(net(x), eager(x)):
            raise RuntimeError(f"{name} does not compute what the eager model computes")
    return built


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(model: Model, x: torch.Tensor, iters: int) -> float:
    """Seconds per call, over ``iters`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - start) / iters


def interleaved(
    contenders: dict[str, Model], x: torch.Tensor, *, rounds: int, iters: int
) -> dict[str, float]:
    """Median seconds per call of each contender; rounds alternate the order."""
    names = list(contenders)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up
        time_calls(contenders[name], x, max(iters // 10, 10))
    with _quiet_gc():
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                samples[name].append(time_calls(contenders[name], x, iters))
    return {n: statistics.median(s) for n, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=150, help="interleaved rounds (median)")
    parser.add_argument("--iters", type=int, default=200, help="calls per model per round")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (3 x 50 calls)")
    args = parser.parse_args(argv)
    rounds, iters = (3, 50) if args.quick else (args.rounds, args.iters)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(BATCH, IN)
        nets: dict[str, Model] = dict(models(x))
        with torch.no_grad():
            no_grad = interleaved(nets, x, rounds=rounds, iters=iters)
        grad = interleaved(nets, x, rounds=rounds, iters=iters)
    finally:
        torch.set_num_threads(threads)

    print(
        f"forward MLP {IN}->{HIDDEN}->{OUT}, batch {BATCH}, CPU, 1 thread; "
        f"median of {rounds} interleaved rounds x {iters} calls (torch {torch.__version__})"
    )
    print(f"{'model':<16}{'no_grad us':>12}{'vs eager':>10}{'grad us':>12}{'vs eager':>10}")
    for name in nets:
        print(
            f"{name:<16}{no_grad[name] * 1e6:>12.2f}{no_grad[name] / no_grad['eager']:>10.3f}"
            f"{grad[name] * 1e6:>12.2f}{grad[name] / grad['eager']:>10.3f}"
        )
    ratio = no_grad["deferinit"] / no_grad["eager"]
    grad_ratio = grad["deferinit"] / grad["eager"]
    verdict = "met" if ratio <= BAR else f"MISSED by {(ratio - BAR) * 100:.1f} points"
    print(f"ratio deferinit/eager (no_grad): {ratio:.3f}  (bar <= {BAR}: {verdict})")
    print(f"ratio deferinit/eager (grad):    {grad_ratio:.3f}")
    noise = no_grad["LazyLinear"] / no_grad["eager"]
    print(f"noise: LazyLinear/eager {noise:.3f} (after materializing, the same code as eager)")
    if args.quick:
        print("(--quick: too few calls for the ratio to mean anything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
