"""``di.materialize`` throughput vs eager construction of the same model (docs/design.md §5).

Two models, CPU: ``mlp`` (8 × ``Linear(2048, 2048)`` with ReLU, 33.6 M parameters)
and ``transformer`` (4 × ``TransformerEncoderLayer(512, 8, 2048)``, 12.6 M
parameters). For each, side by side in one run, median of ``--repeat`` interleaved
rounds (the order alternating):

* ``eager``: construct the model with its sizes written out (allocation and
  initialization, what a user waits for without deferinit), one thread;
* ``materialize``: ``di.materialize`` of the same model written with deferred
  layers and built on meta beforehand (the build is timed apart: it allocates
  nothing and is paid once per model, not per materialization), one thread;
* ``seed=``: the same with ``seed=0`` (every parameter on its own generator),
  one thread;
* ``eager N`` and ``seed= N``: eager construction and ``seed=0`` with torch's
  thread count set to every core (``--threads``): ``di.materialize(seed=)``
  computes that many layers at once;
* ``ceiling``: what that many threads gain on this machine now, deferinit aside
  (each allocates and fills its share of the model's own tensors, split evenly,
  against one thread doing all of it; and the same for 16 MiB tensors), with
  plain allocations: ``seed=`` can pass its model's only by spending less on
  memory than plain allocations do (it asks for huge pages and populated pages,
  ``deferinit._fill._hugepages``), and on a machine whose cores are busy it is
  near 1. Small tensors gain less than large ones (a model's 1-4 MiB tensors
  cost more page faults per element filled where huge pages are scarce).

Throughput ratio = eager seconds / materialize seconds (bars: ≥ 1.0 exact, ≥ 1.6
``seed=`` on 2 cores). Prints a table and the ratios; exits 0 whether or not a bar
is met.

Method: every timed sample, of every contender and in ``ceiling`` too, starts from
the allocator state a user meets when materializing once in a process: fresh
pages. Both sides spend a large part of their time (a third of a transformer's
construction) in the kernel's first-touch page faults of new memory, and whether
a sample gets fresh pages or reuses memory that an earlier sample freed is luck
of the heap, which made ratios swing from 0.7 to 1.4 between runs. So:

* run as a script, the process first fixes glibc's mmap threshold at its
  start-up value (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``): as in a fresh process,
  every large tensor gets its own new mapping, in the main thread and in worker
  threads alike (glibc otherwise raises the threshold after the first large free,
  and later large tensors reuse heap pages; a worker thread's heap is never
  given back);
* before each sample the garbage is collected and glibc hands every free page
  back to the kernel (``malloc_trim(0)``), which is all that
  :func:`timed` does when imported (``benchmarks/run.py``);
* what a sample makes is freed after its clock stops (freeing 100 MiB is not
  part of constructing it).

Skipped quietly where the C library is not glibc. The ``faults`` rows are the
median minor page faults per sample (``getrusage``, every thread): equal counts
across contenders show that both sides paid for their memory alike.

Run: ``.venv/bin/python benchmarks/materialize_throughput.py`` (``--quick``: smoke run).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

BAR = 1.0
BAR_PARALLEL = 1.6


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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_START_THRESHOLD = 128 * 1024  # glibc's mmap threshold at process start


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (it has ``malloc_trim``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc's own, absent elsewhere
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def fresh_pages() -> None:
    """Free what is garbage, and hand every free page of the heap back to the
    kernel, so that the next sample's memory is fresh (see the module's docstring)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def allocate_as_fresh_process() -> None:
    """Every large allocation from now on gets a new mapping, as in a fresh
    process (see the module's docstring). For this process's whole life: only
    for a process that runs this benchmark alone."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _START_THRESHOLD)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sample(run: Callable[[], object]) -> tuple[float, int]:
    """(seconds, minor page faults) of ``run``, from fresh pages; what it returns is
    freed after the clock stops."""
    fresh_pages()
    faults = _faults()
    start = time.perf_counter()
    made = run()
    seconds = time.perf_counter() - start
    faults = _faults() - faults
    del made
    return seconds, faults


def timed(run: Callable[[], object]) -> float:
    """Seconds of ``run``, from fresh pages (:func:`sample`)."""
    return sample(run)[0]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _materialized(
    factory: Factory, width: int, depth: int, seed: int | None
) -> tuple[float, tuple[float, int]]:
    """(build seconds, (materialize seconds, faults)) of one deferred model."""
    start = time.perf_counter()
    model = di.build(factory(width, depth, deferred=True), (2, width), device="meta")
    build = time.perf_counter() - start
    return build, sample(lambda: di.materialize(model, seed=seed))


def model_tensors(factory: Factory, width: int, depth: int) -> list[tuple[torch.Size, torch.dtype]]:
    """The shape and dtype of every parameter and buffer of the model, in
    registration order (read off a build on meta: nothing allocated)."""
    model = di.build(factory(width, depth, deferred=True), (2, width), device="meta")
    return [(t.shape, t.dtype) for t in [*model.parameters(), *model.buffers()]]


def _split(tensors: Sequence[tuple[torch.Size, torch.dtype]], parts: int) -> list[list[int]]:
    """Indices of ``tensors`` in ``parts`` runs of consecutive tensors, each about the
    same number of elements (the best balance a layer-by-layer split can reach)."""
    total = sum(shape.numel() for shape, _ in tensors)
    groups: list[list[int]] = [[] for _ in range(parts)]
    done = 0
    for i, (shape, _) in enumerate(tensors):
        groups[min(parts - 1, done * parts // max(total, 1))].append(i)
        done += shape.numel()
    return groups


def ceiling(
    threads: int,
    repeat: int,
    tensors: Sequence[tuple[torch.Size, torch.dtype]] | None = None,
) -> float:
    """What ``threads`` threads can gain on this machine now, deferinit aside: each
    thread allocates its share of ``tensors`` (a model's, from :func:`model_tensors`;
    default 4 tensors of 16 MiB a thread) and fills them from its own generator (a
    CPU random fill runs on one thread), as ``seed=`` does, against one thread
    doing all of it; ratio of medians, interleaved, each sample from fresh pages.
    The shares are split evenly, which ``seed=`` (a layer at a time) can only
    match, on plain allocations (``seed=`` passes this only by spending less on
    memory). On a machine whose cores are busy with other work this is near 1."""
    if tensors is None:
        tensors = [(torch.Size([1 << 22]), torch.float32)] * (4 * threads)
    groups = _split(tensors, threads)
    made: list[list[torch.Tensor]] = [[] for _ in range(threads)]

    def work(i: int) -> None:
        generator = torch.Generator().manual_seed(i)
        for k in groups[i]:
            shape, dtype = tensors[k]
            made[i].append(torch.empty(shape, dtype=dtype).uniform_(generator=generator))

    def serial() -> list[list[torch.Tensor]]:
        for i in range(threads):
            work(i)
        return made

    def parallel() -> list[list[torch.Tensor]]:
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return made

    def dropped(run: Callable[[], list[list[torch.Tensor]]]) -> float:
        seconds = timed(run)
        for made_here in made:
            made_here.clear()
        return seconds

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples: dict[str, list[float]] = {"serial": [], "parallel": []}
        for r in range(max(3, repeat)):
            for name in ("serial", "parallel") if r % 2 == 0 else ("parallel", "serial"):
                samples[name].append(dropped(serial if name == "serial" else parallel))
    finally:
        torch.set_num_threads(before)
    return statistics.median(samples["serial"]) / statistics.median(samples["parallel"])


def measure(
    factory: Factory, width: int, depth: int, repeat: int, threads: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and median page faults of each variant (see the module's
    docstring)."""
    variants: list[tuple[str, int, int | None]] = [  # name, threads, seed (-1: eager)
        ("eager", 1, -1),
        ("materialize", 1, None),
        ("seed", 1, 0),
        ("eager_all", threads, -1),
        ("seed_all", threads, 0),
    ]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    faults: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    samples["build"] = []
    for r in range(repeat):
        for name, count, seed in variants if r % 2 == 0 else variants[::-1]:
            torch.set_num_threads(count)
            if seed == -1:
                seconds, fault = sample(lambda: factory(width, depth, deferred=False))
            else:
                build, (seconds, fault) = _materialized(factory, width, depth, seed)
                samples["build"].append(build)
            samples[name].append(seconds)
            faults[name].append(fault)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return medians, {k: statistics.median(v) for k, v in faults.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=_cores(), help="default: every core")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    cases: list[tuple[str, Factory, int, int]] = [
        ("mlp", mlp, 2048, 8),
        ("transformer", transformer, 512, 4),
    ]
    if args.quick:
        cases = [("mlp", mlp, 64, 2), ("transformer", transformer, 32, 1)]
    repeat = 1 if args.quick else args.repeat
    n = args.threads
    allocate_as_fresh_process()

    before = torch.get_num_threads()
    try:
        print(f"CPU, median of {repeat} interleaved rounds; seconds (1 thread unless marked)")
        head = f"{'model':<12} {'eager':>8} {'materialize':>12} {'seed=':>8}"
        print(f"{head} {f'eager {n}':>9} {f'seed= {n}':>9} {'(build)':>8}")
        ratios = []
        for name, factory, width, depth in cases:
            m, f = measure(factory, width, depth, repeat, n)
            row = f"{name:<12} {m['eager']:8.4f} {m['materialize']:12.4f} {m['seed']:8.4f}"
            print(f"{row} {m['eager_all']:9.4f} {m['seed_all']:9.4f} {m['build']:8.4f}")
            row = f"{'  faults':<12} {f['eager']:8.0f} {f['materialize']:12.0f} {f['seed']:8.0f}"
            print(f"{row} {f['eager_all']:9.0f} {f['seed_all']:9.0f}")
            ratios.append(
                (
                    name,
                    m["eager"] / m["materialize"],
                    m["eager"] / m["seed"],
                    m["eager_all"] / m["seed_all"],
                )
            )
        for name, plain, seeded, parallel in ratios:
            met = "met" if plain >= BAR else "missed"
            print(f"ratio {name} throughput materialize / eager: {plain:.2f} (bar ≥ {BAR}: {met})")
            print(f"ratio {name} throughput materialize seed= / eager: {seeded:.2f}")
            met = "met" if parallel >= BAR_PARALLEL else "missed"
            print(
                f"ratio {name} throughput materialize seed= / eager, {n} threads: {parallel:.2f} "
                f"(bar ≥ {BAR_PARALLEL} on 2 cores: {met})"
            )
        for name, factory, width, depth in cases:
            limit = ceiling(n, repeat, model_tensors(factory, width, depth))
            print(f"ceiling {name}: {n} threads filling its tensors / one thread: {limit:.2f}")
        limit = ceiling(n, repeat)
        print(f"ceiling: {n} threads filling 16 MiB tensors / one thread: {limit:.2f}")
    finally:
        torch.set_num_threads(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
