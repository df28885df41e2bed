"""One rank's exact-slice ``di.materialize`` vs a single-process one (docs/design.md §5).

The model is ``--layers`` x ``nn.TransformerEncoderLayer(--width)`` written with
deferred layers and built on ``meta``. Side by side in one process, CPU, one
thread, median of ``--rounds`` interleaved rounds (the order alternating):

* ``single``: ``di.materialize(model)`` of the whole model, one process;
* ``sharded``: rank 0 of a world of ``--world``: every layer and the root
  ``fully_shard``-ed (FSDP2, ``Shard(0)``), then ``di.materialize(model)``: the
  rank computes the exact slice of the single-process values it holds;
* ``tp``: the same rank, tensor parallel instead (``parallelize_module``: each
  layer's ``linear1`` column-wise, ``linear2`` and ``self_attn.out_proj`` row-wise;
  the attention's input projection stays whole on every rank).

The process group is torch's fake backend (``torch.testing``'s ``FakeStore``):
one process plays rank 0 and no other rank exists; ``di.materialize`` needs no
collective. Builds and sharding are not timed. Peak extra memory of a sharded
materialize is its peak resident set (VmHWM, reset through
``/proc/self/clear_refs``, large blocks returned at once: ``sharded_init.py``'s
helpers) above the resident set before it, less what the rank keeps; it is
reported over the largest single tensor of the model (bar: about one).
Bar: sharded / single time <= 1.3.

Run: ``.venv/bin/python benchmarks/sharded_materialize.py`` (``--quick``: smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from sharded_init import _reset_peak, _return_large_blocks, _status
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.testing._internal.distributed.fake_pg import FakeStore

import deferinit as di
from deferinit import nn as dnn

BAR_TIME = 1.3


def model(layers: int, width: int) -> nn.Module:
    net = nn.Sequential(
        *(
            dnn.TransformerEncoderLayer(nhead=8, dim_feedforward=4 * width, dropout=0.0)
            for _ in range(layers)
        )
    )
    return di.build(net, (4, width), device="meta")


def _held(net: nn.Module) -> int:
    tensors = [*net.parameters(), *net.buffers()]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def shard(net: nn.Module, variant: str, world: int) -> None:
    if variant == "sharded":
        for layer in net.children():
            fully_shard(layer)
        fully_shard(net)
    elif variant == "tp":
        mesh = init_device_mesh("cpu", (world,))
        plan: dict[str, ParallelStyle] = {
            "linear1": ColwiseParallel(),
            "linear2": RowwiseParallel(),
            "self_attn.out_proj": RowwiseParallel(),
        }
        for layer in net.children():
            parallelize_module(layer, mesh, plan)


def timed(variant: str, layers: int, width: int, world: int) -> tuple[float, float | None]:
    """(seconds, peak extra bytes) of one materialize."""
    net = model(layers, width)
    shard(net, variant, world)
    torch.manual_seed(0)
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    di.materialize(net)
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM")
    extra = None if peak is None or before is None else max(0, peak - before - _held(net))
    del net
    gc.collect()
    return elapsed, extra


VARIANTS = ("single", "sharded", "tp")


def measure(*, layers: int, width: int, world: int, rounds: int) -> dict[str, float]:
    """Median seconds of each variant, the sharded peak extra bytes, the largest tensor's."""
    _return_large_blocks()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        for variant in VARIANTS:
            timed(variant, 1, width, world)  # warm-up
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        extras: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                seconds, extra = timed(variant, layers, width, world)
                samples[variant].append(seconds)
                if extra is not None:
                    extras[variant].append(extra)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    largest = max(t.numel() * t.element_size() for t in model(1, width).parameters())

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    return {
        "single_s": median(samples["single"]),
        "sharded_s": median(samples["sharded"]),
        "peak_extra_bytes": median(extras["sharded"]),
        "tp_s": median(samples["tp"]),
        "tp_peak_extra_bytes": median(extras["tp"]),
        "largest_tensor_bytes": float(largest),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    layers, width, rounds = (2, 64, 1) if args.quick else (args.layers, args.width, args.rounds)
    m = measure(layers=layers, width=width, world=args.world, rounds=rounds)
    if args.json:
        print(json.dumps(m))
        return 0
    mib = 1 << 20
    print(
        f"{layers} x TransformerEncoderLayer({width}), rank 0 of {args.world}, "
        f"CPU, 1 thread, median of {rounds}"
    )
    print(f"single {m['single_s']:.3f} s, FSDP2 {m['sharded_s']:.3f} s, TP {m['tp_s']:.3f} s")
    print(
        f"peak extra FSDP2 {m['peak_extra_bytes'] / mib:.1f} MiB, "
        f"TP {m['tp_peak_extra_bytes'] / mib:.1f} MiB, "
        f"largest tensor {m['largest_tensor_bytes'] / mib:.1f} MiB"
    )
    for label, seconds, extra in (
        ("sharded", "sharded_s", "peak_extra_bytes"),
        ("tp", "tp_s", "tp_peak_extra_bytes"),
    ):
        ratio = m[seconds] / m["single_s"]
        print(f"ratio {label} / single time: {ratio:.2f}  (bar <= {BAR_TIME})")
        over = m[extra] / m["largest_tensor_bytes"]
        print(f"ratio {label} peak extra / largest tensor: {over:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
