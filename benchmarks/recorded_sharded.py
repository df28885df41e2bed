"""One rank's ``di.materialize`` of a *recorded* model (``di.deferred_init``), sharded
with FSDP2 or tensor parallelism, vs a single-process materialize of the same record
(issue 10 item 7; docs/design.md §5).

The model is ``--layers`` x ``nn.TransformerEncoderLayer(--width)`` written with
plain ``torch.nn`` layers and explicit sizes (for tensor parallelism: the same
number of ``Linear(w, 4w) -> Linear(4w, w)`` pairs, ``ColwiseParallel`` then
``RowwiseParallel``), recorded with ``di.deferred_init``. Side by side in one
process, CPU, one thread, median of ``--rounds`` interleaved rounds:

* ``single``: ``di.materialize(model)``, the whole model in one process;
* ``fsdp``: rank 0 of a world of ``--world``: every layer and the root
  ``fully_shard``-ed (``Shard(0)``), then ``di.materialize(model)``;
* ``tp``: rank 0 of ``--world``: ``parallelize_module`` (``Shard(0)``/``Shard(1)``).

The process group is torch's fake backend (``FakeStore``): one process plays rank 0.
Recording, sharding and building are not timed. Peak extra memory: the peak resident
set during materialize above the resident set before it, less what the rank keeps,
over the largest single tensor (``sharded_init.py``'s helpers).

Run: ``.venv/bin/python benchmarks/recorded_sharded.py`` (``--quick``: smoke run).
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

import deferinit as di

BAR_TIME = 1.3


def encoder(layers: int, width: int) -> nn.Module:
    return nn.Sequential(
        *(nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0) for _ in range(layers))
    )


def mlp(layers: int, width: int) -> nn.Module:
    pairs = [(nn.Linear(width, 4 * width), nn.Linear(4 * width, width)) for _ in range(layers)]
    return nn.Sequential(*(nn.Sequential(a, b) for a, b in pairs))


def _held(net: nn.Module) -> int:
    tensors = [*net.parameters(), *net.buffers()]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def prepared(variant: str, layers: int, width: int, world: int) -> nn.Module:
    if variant in ("single", "fsdp"):
        net = di.deferred_init(encoder, layers, width)
        if variant == "fsdp":
            for layer in net.children():
                fully_shard(layer)
            fully_shard(net)
        return net
    net = di.deferred_init(mlp, layers, width)
    if variant == "tp":
        mesh = init_device_mesh("cpu", (world,))
        plan: dict[str, ParallelStyle] = {f"{i}.0": ColwiseParallel() for i in range(layers)}
        plan.update({f"{i}.1": RowwiseParallel() for i in range(layers)})
        parallelize_module(net, mesh, plan)
    return net


def timed(variant: str, layers: int, width: int, world: int) -> tuple[float, float | None]:
    """(seconds, peak extra bytes) of one materialize."""
    net = prepared(variant, layers, width, world)
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


def measure(*, layers: int, width: int, world: int, rounds: int) -> dict[str, float]:
    _return_large_blocks()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: PLC0415

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    variants = ("single", "fsdp", "single_mlp", "tp")
    try:
        for v in variants:
            timed(v, 1, 64, world)  # warm-up
        samples: dict[str, list[float]] = {v: [] for v in variants}
        extras: dict[str, list[float]] = {"fsdp": [], "tp": []}
        for r in range(rounds):
            for v in variants if r % 2 == 0 else tuple(reversed(variants)):
                seconds, extra = timed(v, layers, width, world)
                samples[v].append(seconds)
                if v in extras and extra is not None:
                    extras[v].append(extra)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
    largest = 4 * width * width * 4  # the 4w x w float32 weights of both models
    med = {v: statistics.median(s) for v, s in samples.items()}
    return {
        "fsdp_ratio_vs_single": med["fsdp"] / med["single"],
        "tp_ratio_vs_single": med["tp"] / med["single_mlp"],
        "fsdp_peak_extra_ratio_vs_largest_tensor": statistics.median(extras["fsdp"]) / largest
        if extras["fsdp"]
        else float("nan"),
        "tp_peak_extra_ratio_vs_largest_tensor": statistics.median(extras["tp"]) / largest
        if extras["tp"]
        else float("nan"),
        **{f"{v}_s": m for v, m in med.items()},
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
    print(
        f"recorded: {layers} layers of width {width}, rank 0 of {args.world}, CPU, 1 thread, "
        f"median of {rounds}"
    )
    for key, value in m.items():
        bar = f"  (bar <= {BAR_TIME})" if key.endswith("ratio_vs_single") else ""
        print(f"{key}: {value:.3f}{bar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
