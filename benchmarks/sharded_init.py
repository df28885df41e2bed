"""What sharded materialization costs a rank, in time and memory (docs/design.md §3.9).

CPU's random generator cannot skip ahead, so for a rank's shard to hold exactly
the single-process values every rank runs every layer's initialization. This
script plays one rank of a world of ``--world`` ranks (it keeps the first
``1/world`` of each tensor along dim 0, as FSDP2's ``Shard(0)`` does) on a stack of
``--layers`` ``nn.TransformerEncoderLayer(--width)`` layers, CPU, one thread, and
compares side by side in one run:

* ``single``: one process, whole model (``di.materialize`` of a meta build): the
  time baseline; its tensors become the model's, so no extra memory.
* ``whole-layer``: a rank builds each layer whole, then keeps its slices: extra
  memory is one layer.
* ``one-pass``: what ``di.materialize`` does for sharded tensors
  (``each_tensor`` with a ``keep``): each layer's initialization runs once, each
  tensor written in one reused scratch buffer, its slice kept before the next
  tensor is written: extra memory is one tensor.
* ``groups``: the longer way ``di.materialize`` takes where one pass cannot follow
  the initialization: a run of the layer per group of tensors (other tensors'
  random fills on a throw-away tensor): extra memory is one tensor, time a run per
  group.
* ``seeded``: ``seed=`` mode, one pass, each tensor on its own generator.

Peak extra memory is the peak resident set during the run above what the rank
keeps (Linux ``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``;
large blocks are returned to the system at once, ``mallopt``). Prints a table and
ratios; exits 0 whether or not anything is fast.

Run: ``.venv/bin/python benchmarks/sharded_init.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill._dispatch import named_tensors, registration_order, saved_generators
from deferinit._fill._each import _by_groups, _Source, each_tensor
from deferinit._fill._once import Scratch

MiB = 1 << 20


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> None:
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _return_large_blocks() -> None:
    """Large allocations by mmap, so that freeing them shows in the resident set."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def layer_factory(width: int) -> Callable[[], nn.Module]:
    return lambda: nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0)


def keep(value: torch.Tensor, world: int) -> torch.Tensor:
    rows = -(-value.shape[0] // world) if value.dim() else 1
    return value.detach()[:rows].clone() if value.dim() else value.detach().clone()


def by_groups(
    make: Callable[[], nn.Module], names: list[str], world: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The longer way of ``each_tensor`` (private helpers: a run per group)."""
    cpu = torch.device("cpu")
    generators = saved_generators(cpu)
    order = registration_order(make)
    source = _Source(make, cpu, None, None, generators)
    return _by_groups(source, make, names, order, lambda name, v: keep(v, world))


def run(variant: str, layers: int, width: int, world: int) -> tuple[float, int | None, int]:
    """(seconds, peak extra bytes, kept bytes) of one variant."""
    make = layer_factory(width)
    names = list(named_tensors(make()))
    kept: list[torch.Tensor] = []
    scratch = Scratch()
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    if variant == "single":
        model = di.build(
            nn.Sequential(
                *(
                    dnn.TransformerEncoderLayer(nhead=8, dim_feedforward=4 * width, dropout=0.0)
                    for _ in range(layers)
                )
            ),
            (4, width),
            device="meta",
        )
        di.materialize(model)
        kept = list(model.parameters())
    else:
        for index in range(layers):
            if variant == "whole-layer":
                kept += [keep(t, world) for t in named_tensors(make()).values()]
            elif variant == "groups":
                kept += [value for _, value in by_groups(make, names, world)]
            else:
                seeds = (
                    (lambda n, i=index: zlib.crc32(f"{i}.{n}".encode()))
                    if variant == "seeded"
                    else None
                )
                values = each_tensor(
                    make,
                    names,
                    torch.device("cpu"),
                    seeds,
                    keep=lambda name, v: keep(v, world),
                    scratch=scratch,
                )
                kept += [value for _, value in values]
    elapsed = time.perf_counter() - start
    del scratch
    peak, kept_bytes = _status("VmHWM"), sum(t.numel() * t.element_size() for t in kept)
    extra = None if peak is None or before is None else max(0, peak - before - kept_bytes)
    return elapsed, extra, kept_bytes


VARIANTS = ("single", "whole-layer", "one-pass", "groups", "seeded")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    layers, width = (2, 64) if args.quick else (args.layers, args.width)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _return_large_blocks()
    try:
        make = layer_factory(width)
        tensors = named_tensors(make())
        largest = max(t.numel() * t.element_size() for t in tensors.values())
        layer = sum(t.numel() * t.element_size() for t in tensors.values())
        print(
            f"{layers} x TransformerEncoderLayer({width}), one rank of {args.world}, CPU, 1 thread"
        )
        print(f"largest tensor {largest / MiB:.1f} MiB, one layer {layer / MiB:.1f} MiB")
        print(f"{'variant':<12} {'seconds':>8} {'peak extra MiB':>15} {'kept MiB':>9}")
        for variant in VARIANTS:
            run(variant, 1, 64, args.world)  # warm-up: imports, caches
        results: dict[str, tuple[float, int | None, int]] = {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            results[variant] = seconds, extra, kept = run(variant, layers, width, args.world)
            shown = "n/a" if extra is None else f"{extra / MiB:.1f}"
            print(f"{variant:<12} {seconds:8.3f} {shown:>15} {kept / MiB:9.1f}")
        base = results["single"][0]
        for variant in VARIANTS[1:]:
            print(f"ratio {variant} / single time: {results[variant][0] / base:.2f}")
        whole_extra, one_extra = results["whole-layer"][1], results["one-pass"][1]
        if whole_extra and one_extra is not None:
            print(f"ratio one-pass / whole-layer peak extra memory: {one_extra / whole_extra:.2f}")
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
