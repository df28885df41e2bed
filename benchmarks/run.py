"""Every figure deferinit is held to (docs/design.md §5, issue 11), in one run.

Prints one Markdown table (figure, value, bar, met?) and writes the figures to one
JSON file (``--json PATH``). Ratios are ratios of medians, the contenders measured
side by side in this run (alternating, so that a busy machine slows both alike),
CPU, one thread unless the figure is about threads. How each figure is measured:
``benchmarks/README.md`` and the docstrings of the scripts imported below.

    .venv/bin/python benchmarks/run.py                 # full run, < 20 min on 2 cores
    .venv/bin/python benchmarks/run.py --quick         # fewer repetitions, < 4 min
    .venv/bin/python benchmarks/run.py --smoke         # every path once, numbers mean nothing
    .venv/bin/python benchmarks/run.py --only first-call,rnn --json out.json

Exits 0 whether or not the bars are met; 1 if a measurement failed (its figures
are then ``null`` in the JSON and the traceback is on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import build_scaling
import construct_first_forward
import first_call
import forward_overhead
import import_overhead
import materialize_throughput
import meta_build
import rnn_build
import torch
from torch import nn

import deferinit as di

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one mode."""

    forward: tuple[int, int]  # interleaved rounds, calls per round
    steady: tuple[int, float]  # rounds, scale of first_call.REPS
    first_use: Mapping[str, int]  # fresh interpreters per variant, per model
    build_sizes: tuple[int, ...]
    build_repeat: int
    meta_reps: int
    materialize: tuple[tuple[str, int, int], ...]  # model, width, depth
    materialize_rounds: int
    sharded: tuple[str, ...]  # sharded_materialize.py arguments
    rnn: tuple[int, int]  # rounds, runs per round
    import_reps: int
    recorded_cost: tuple[str, ...] = ("--quick",)  # record_cost.py arguments


PLANS = {
    "smoke": Plan(
        forward=(2, 20),
        steady=(1, 0.05),
        first_use={"MLP": 1},
        build_sizes=(100, 1000, 10_000),
        build_repeat=1,
        meta_reps=1,
        materialize=(("mlp", 64, 2), ("transformer", 32, 1)),
        materialize_rounds=1,
        sharded=("--layers", "2", "--width", "512", "--rounds", "1"),
        rnn=(1, 1),
        import_reps=1,
    ),
    "quick": Plan(
        forward=(40, 200),
        steady=(5, 0.5),
        first_use={"MLP": 3, "LeNet": 1, "ResNet": 1},
        build_sizes=(100, 1000, 10_000),
        build_repeat=2,
        meta_reps=1,
        materialize=(("mlp", 2048, 8), ("transformer", 512, 4)),
        materialize_rounds=5,
        sharded=("--rounds", "3"),
        rnn=(5, 2),
        import_reps=3,
    ),
    "full": Plan(
        forward=(150, 200),
        steady=(15, 1.0),
        # The MLP's and LeNet's first uses (about 1 and 4 ms) have deferinit and Lazy*
        # within a few percent of each other: more fresh interpreters for a steadier
        # median (9 for LeNet gave 1.14-1.40 between runs).
        first_use={"MLP": 21, "LeNet": 21, "ResNet": 9},
        build_sizes=(100, 300, 1000, 3000, 10_000),
        build_repeat=3,
        meta_reps=3,
        materialize=(("mlp", 2048, 8), ("transformer", 512, 4)),
        materialize_rounds=15,
        sharded=("--rounds", "5"),
        rnn=(9, 3),
        import_reps=7,
        recorded_cost=("--rounds", "7"),
    ),
}

Figures = dict[str, float]
NOTES: list[str] = []  # printed under the table


def _note(text: str) -> None:
    NOTES.append(text)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- forward after build --------------------------------------------------------------


def forward(plan: Plan) -> Figures:
    """No-grad forward of the built model vs the eager one (equal weights), interleaved."""
    rounds, iters = plan.forward
    x = torch.randn(forward_overhead.BATCH, forward_overhead.IN)
    nets = forward_overhead.models(x)
    torch.manual_seed(0)
    eager = construct_first_forward.lenet("eager")
    deferred = construct_first_forward.lenet("deferinit")
    image = torch.randn(construct_first_forward.MODELS["LeNet"][1])
    deferred(image)
    deferred.load_state_dict(eager.state_dict())
    if not torch.equal(deferred(image), eager(image)):
        raise RuntimeError("the built LeNet does not compute what the eager LeNet computes")
    with torch.no_grad():
        mlp = forward_overhead.interleaved(
            {"eager": nets["eager"], "deferinit": nets["deferinit"]}, x, rounds=rounds, iters=iters
        )
        lenet = forward_overhead.interleaved(  # a LeNet forward lasts ~5 MLP forwards
            {"eager": eager, "deferinit": deferred}, image, rounds=rounds, iters=iters // 5
        )
    _note(
        f"forward (no_grad, {rounds} rounds x {iters} MLP / {iters // 5} LeNet calls): MLP eager "
        f"{mlp['eager'] * 1e6:.1f} us, LeNet eager {lenet['eager'] * 1e6:.1f} us"
    )
    return {
        "forward_ratio_vs_eager": mlp["deferinit"] / mlp["eager"],
        "lenet_forward_ratio_vs_eager": lenet["deferinit"] / lenet["eager"],
    }


# --- construct + first forward ---------------------------------------------------------

PREFIX = {"MLP": "", "LeNet": "lenet_", "ResNet": "resnet_"}


def _first_call_keys(model: str, regime: str, cells: Mapping[str, float]) -> Figures:
    prefix = PREFIX[model]
    eager = cells["eager"]
    _note(f"construct + first forward, {model}, {regime}: eager {eager * 1e6:.0f} us")
    return {
        f"{prefix}first_{regime}_ratio_vs_eager": cells["deferinit"] / eager,
        f"lazy_{prefix}first_{regime}_ratio_vs_eager": cells["Lazy"] / eager,
    }


def first_call_steady(plan: Plan) -> Figures:
    rounds, scale = plan.steady
    figures: Figures = {}
    for model in first_call.MODELS:
        reps = max(1, round(first_call.REPS[model] * scale))
        cells = first_call.steady(model, rounds=rounds, reps=reps)
        figures |= _first_call_keys(model, "call", cells)
    return figures


def first_use(plan: Plan) -> Figures:
    figures: Figures = {}
    for model, reps in plan.first_use.items():
        figures |= _first_call_keys(model, "use", first_call.first_use(model, reps=reps))
    return figures


# --- builds -----------------------------------------------------------------------------


def build(plan: Plan) -> Figures:
    """Construct + first forward (the build) of N x dnn.Linear(16); log-log slope over N."""
    build_scaling.construct_and_build(10, deferred=True, relu=False)  # the layout cache
    seconds: dict[int, float] = {}
    for n in plan.build_sizes:
        runs = [
            sum(build_scaling.construct_and_build(n, deferred=True, relu=False))
            for _ in range(plan.build_repeat)
        ]
        seconds[n] = statistics.median(runs)
    xs = [math.log(n) for n in seconds]
    ys = [math.log(s) for s in seconds.values()]
    slope = statistics.linear_regression(xs, ys).slope
    _note("build: " + ", ".join(f"N={n}: {s:.3f} s" for n, s in seconds.items()))
    return {"build_10000_layers_s": seconds[10_000], "build_scaling_exponent": slope}


def meta_build_70b(plan: Plan) -> Figures:
    seconds, mib = meta_build.measure(layers=80, reps=plan.meta_reps)
    return {"meta_build_70b_s": seconds, "meta_build_70b_peak_rss_mib": mib}


def rnn(plan: Plan) -> Figures:
    rounds, reps = plan.rnn
    cells = rnn_build.measure("GRU", rounds=rounds, reps=reps)
    _note(
        f"rnn: eager construct + forward {cells['eager'] * 1e3:.2f} ms, "
        f"construct + di.build {cells['deferinit'] * 1e3:.2f} ms"
    )
    return {"rnn_build_ratio_vs_eager": cells["deferinit"] / cells["eager"]}


# --- materialize --------------------------------------------------------------------------

FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": materialize_throughput.mlp,
    "transformer": materialize_throughput.transformer,
}


def _materialize_ratio(name: str, width: int, depth: int, rounds: int, seed: int | None) -> float:
    """Throughput: median eager construction seconds / median materialize seconds."""
    factory = FACTORIES[name]
    example = (2, width)

    def eager() -> float:
        return materialize_throughput.timed(lambda: factory(width, depth, deferred=False))

    def deferred() -> float:
        model = di.build(factory(width, depth, deferred=True), example, device="meta")
        return materialize_throughput.timed(lambda: di.materialize(model, seed=seed))

    samples: dict[str, list[float]] = {"eager": [], "materialize": []}
    for r in range(rounds):
        order = ("eager", "materialize") if r % 2 == 0 else ("materialize", "eager")
        for variant in order:
            samples[variant].append(eager() if variant == "eager" else deferred())
    return statistics.median(samples["eager"]) / statistics.median(samples["materialize"])


def materialize(plan: Plan) -> Figures:
    """Measured in its own interpreter, allocating as a fresh process does
    (``materialize_throughput.allocate_as_fresh_process``: every large tensor on
    new pages, worker threads' heaps included), which lasts for that process's
    life and so must not touch the other groups."""
    mode = next(m for m, p in PLANS.items() if p is plan)
    command = [sys.executable, "-W", "ignore", __file__, "--materialize-child", mode]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.splitlines()[-1])
    NOTES.extend(out["notes"])
    figures: Figures = out["figures"]
    return figures


def _materialize_here(plan: Plan) -> Figures:
    exact: dict[str, float] = {}
    seeded: dict[str, float] = {}
    rounds = plan.materialize_rounds
    for name, width, depth in plan.materialize:
        exact[name] = _materialize_ratio(name, width, depth, rounds, seed=None)
    cores = _cores()
    with _threads(cores):
        for name, width, depth in plan.materialize:
            seeded[name] = _materialize_ratio(name, width, depth, rounds, seed=0)
    limits = {
        name: materialize_throughput.ceiling(
            cores, rounds, materialize_throughput.model_tensors(FACTORIES[name], width, depth)
        )
        for name, width, depth in plan.materialize
    }
    _note(
        "materialize throughput (the worst model is the figure): exact "
        + ", ".join(f"{n} {r:.2f}" for n, r in exact.items())
        + f"; seed= with {cores} threads "
        + ", ".join(f"{n} {r:.2f}" for n, r in seeded.items())
        + " (eager construction with the same threads; di.materialize(seed=) is measured "
        "as it is: whether it uses more than one core is its own business); ceiling: "
        f"{cores} threads allocating and filling a model's own tensors gain "
        + ", ".join(f"{n} {r:.2f}x" for n, r in limits.items())
        + " over one on this machine now"
    )
    return {
        "materialize_ratio_vs_eager": min(exact.values()),
        "materialize_parallel_ratio_vs_eager": min(seeded.values()),
    }


def sharded(plan: Plan) -> Figures:
    """One FSDP2 rank's exact-slice materialize, in its own interpreter (clean memory)."""
    script = HERE / "sharded_materialize.py"
    command = [sys.executable, "-W", "ignore", str(script), "--json", *plan.sharded]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    m = json.loads(done.stdout.splitlines()[-1])
    _note(
        f"sharded: single {m['single_s']:.3f} s, rank 0 of 2 {m['sharded_s']:.3f} s, "
        f"peak extra {m['peak_extra_bytes'] / 2**20:.1f} MiB, "
        f"largest tensor {m['largest_tensor_bytes'] / 2**20:.1f} MiB"
    )
    return {
        "sharded_exact_ratio_vs_single": m["sharded_s"] / m["single_s"],
        "sharded_tp_ratio_vs_single": m["tp_s"] / m["single_s"],
        "sharded_exact_peak_extra_ratio_vs_largest_tensor": (
            m["peak_extra_bytes"] / m["largest_tensor_bytes"]
        ),
    }


def _json_child(script: str, *args: str) -> dict[str, float]:
    command = [sys.executable, "-W", "ignore", str(HERE / script), "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return figures


def recorded(plan: Plan) -> Figures:
    """``di.deferred_init``: record + materialize of a Hugging Face Llama vs eager, the
    70B-shaped record, and one rank's materialize of a recorded model sharded with
    FSDP2 / tensor parallelism (each in its own interpreter)."""
    cost = _json_child("record_cost.py", *plan.recorded_cost)
    shards = _json_child("recorded_sharded.py", *plan.sharded)
    _note(
        f"recorded: single {shards['single_s']:.3f} s, FSDP2 rank {shards['fsdp_s']:.3f} s; "
        f"MLP single {shards['single_mlp_s']:.3f} s, TP rank {shards['tp_s']:.3f} s; "
        f"record {cost['record_bytes_per_op']:.0f} bytes per operation"
    )
    return {
        "hf_record_materialize_ratio_vs_eager": cost["hf_record_materialize_ratio_vs_eager"],
        "record_70b_s": cost["record_70b_s"],
        "record_70b_peak_rss_mib": cost["record_70b_peak_rss_mib"],
        "recorded_fsdp_ratio_vs_single": shards["fsdp_ratio_vs_single"],
        "recorded_fsdp_peak_extra_ratio_vs_largest_tensor": shards[
            "fsdp_peak_extra_ratio_vs_largest_tensor"
        ],
        "recorded_tp_ratio_vs_single": shards["tp_ratio_vs_single"],
        "recorded_tp_peak_extra_ratio_vs_largest_tensor": shards[
            "tp_peak_extra_ratio_vs_largest_tensor"
        ],
    }


def imports(plan: Plan) -> Figures:
    m = import_overhead.measure(reps=plan.import_reps)
    _note(f"import torch alone: {m['torch_s']:.3f} s")
    return {"import_overhead_s": m["seconds"], "import_overhead_mib": m["mib"]}


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    name: str
    keys: tuple[str, ...]
    measure: Callable[[Plan], Figures]


GROUPS = (
    Group("forward", ("forward_ratio_vs_eager", "lenet_forward_ratio_vs_eager"), forward),
    Group(
        "first-call",
        tuple(
            f"{lazy}{PREFIX[m]}first_call_ratio_vs_eager"
            for m in first_call.MODELS
            for lazy in ("", "lazy_")
        ),
        first_call_steady,
    ),
    Group(
        "first-use",
        tuple(
            f"{lazy}{PREFIX[m]}first_use_ratio_vs_eager"
            for m in first_call.MODELS
            for lazy in ("", "lazy_")
        ),
        first_use,
    ),
    Group("build", ("build_10000_layers_s", "build_scaling_exponent"), build),
    Group("meta70b", ("meta_build_70b_s", "meta_build_70b_peak_rss_mib"), meta_build_70b),
    Group(
        "materialize",
        ("materialize_ratio_vs_eager", "materialize_parallel_ratio_vs_eager"),
        materialize,
    ),
    Group(
        "sharded",
        (
            "sharded_exact_ratio_vs_single",
            "sharded_exact_peak_extra_ratio_vs_largest_tensor",
            "sharded_tp_ratio_vs_single",
        ),
        sharded,
    ),
    Group("rnn", ("rnn_build_ratio_vs_eager",), rnn),
    Group(
        "recorded",
        (
            "hf_record_materialize_ratio_vs_eager",
            "record_70b_s",
            "record_70b_peak_rss_mib",
            "recorded_fsdp_ratio_vs_single",
            "recorded_fsdp_peak_extra_ratio_vs_largest_tensor",
            "recorded_tp_ratio_vs_single",
            "recorded_tp_peak_extra_ratio_vs_largest_tensor",
        ),
        recorded,
    ),
    Group("import", ("import_overhead_s", "import_overhead_mib"), imports),
)


@dataclass(frozen=True)
class Bar:
    text: str
    met: Callable[[float, Mapping[str, float | None]], bool]


def _at_most(limit: float) -> Callable[[float, Mapping[str, float | None]], bool]:
    return lambda value, _: value <= limit


def _below(limit: float) -> Callable[[float, Mapping[str, float | None]], bool]:
    return lambda value, _: value < limit


def _at_least(limit: float) -> Callable[[float, Mapping[str, float | None]], bool]:
    return lambda value, _: value >= limit


def _first_call_bar(lazy_key: str) -> Bar:
    def met(value: float, figures: Mapping[str, float | None]) -> bool:
        lazy = figures.get(lazy_key)
        return value <= 1.5 and lazy is not None and value <= lazy

    return Bar("≤ 1.5 and ≤ Lazy (goal 1.2)", met)


BARS: dict[str, Bar] = {
    "forward_ratio_vs_eager": Bar("≤ 1.03", _at_most(1.03)),
    "build_10000_layers_s": Bar("< 3", _below(3.0)),
    "build_scaling_exponent": Bar("≤ 1.1 (linear)", _at_most(1.1)),
    "meta_build_70b_s": Bar("< 10", _below(10.0)),
    "meta_build_70b_peak_rss_mib": Bar("< 1024", _below(1024.0)),
    "materialize_ratio_vs_eager": Bar("≥ 1.0", _at_least(1.0)),
    "materialize_parallel_ratio_vs_eager": Bar("≥ 1.6 (2 cores)", _at_least(1.6)),
    "sharded_exact_ratio_vs_single": Bar("≤ 1.3", _at_most(1.3)),
    "sharded_tp_ratio_vs_single": Bar("≤ 1.3", _at_most(1.3)),
    "sharded_exact_peak_extra_ratio_vs_largest_tensor": Bar("≈ 1 (≤ 1.5)", _at_most(1.5)),
    "rnn_build_ratio_vs_eager": Bar("≤ 3", _at_most(3.0)),
    "record_70b_s": Bar("< 10", _below(10.0)),
    "record_70b_peak_rss_mib": Bar("< 1024", _below(1024.0)),
    "recorded_fsdp_ratio_vs_single": Bar("≤ 1.3", _at_most(1.3)),
    "recorded_fsdp_peak_extra_ratio_vs_largest_tensor": Bar("≈ 1 (≤ 1.5)", _at_most(1.5)),
    "recorded_tp_ratio_vs_single": Bar("≤ 1.3", _at_most(1.3)),
    "recorded_tp_peak_extra_ratio_vs_largest_tensor": Bar("≈ 1 (≤ 1.5)", _at_most(1.5)),
    "import_overhead_s": Bar("≤ 0.1 (issue 11)", _at_most(0.1)),
    "import_overhead_mib": Bar("≤ 10 (issue 11)", _at_most(10.0)),
}
for _model in first_call.MODELS:
    for _regime in ("call", "use"):
        _key = f"{PREFIX[_model]}first_{_regime}_ratio_vs_eager"
        BARS[_key] = _first_call_bar(f"lazy_{_key}")


def table(figures: Mapping[str, float | None]) -> str:
    rows = ["| figure | value | bar | met? |", "|---|---|---|---|"]
    for key, value in figures.items():
        bar = BARS.get(key)
        if value is None:
            shown, met = "error", "—"
        else:
            shown = f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
            met = "—" if bar is None else ("yes" if bar.met(value, figures) else "**no**")
        rows.append(f"| `{key}` | {shown} | {bar.text if bar else '—'} | {met} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="fewer repetitions (< 4 min)")
    modes.add_argument("--smoke", action="store_true", help="every path once, tiny sizes")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    names = [g.name for g in GROUPS]
    parser.add_argument(
        "--only", metavar="GROUPS", help=f"comma-separated subset of: {', '.join(names)}"
    )
    parser.add_argument("--materialize-child", choices=list(PLANS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.materialize_child:
        materialize_throughput.allocate_as_fresh_process()
        torch.set_num_threads(1)
        measured = _materialize_here(PLANS[args.materialize_child])
        print(json.dumps({"figures": measured, "notes": NOTES}))
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[mode]
    wanted = args.only.split(",") if args.only else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(names)}")

    figures: dict[str, float | None] = {}
    failed = False
    started = time.perf_counter()
    with _threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch < 2.5: lazy modules are new
        for group in GROUPS:
            if group.name not in wanted:
                continue
            print(f"[run.py] {group.name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                figures.update(group.measure(plan))
            except Exception:  # noqa: BLE001 - report, keep measuring the others
                traceback.print_exc()
                failed = True
                figures.update(dict.fromkeys(group.keys))
            print(
                f"[run.py] {group.name}: {time.perf_counter() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started

    print(
        f"deferinit {di.__version__}, torch {torch.__version__}, Python "
        f"{platform.python_version()}, {_cores()} CPU cores, {mode} run, {elapsed:.0f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print()
    print(table(figures))
    print()
    for note in NOTES:
        print(f"- {note}")
    if mode != "full":
        print(f"- {mode} run: few repetitions; the full run's figures are the ones to quote")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
