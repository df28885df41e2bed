"""The benchmark scripts run (``--quick``) and report their ratios; ``run.py`` gives
every figure of docs/design.md §5.

Only that they run: timings are read by people from the scripts' output
(benchmarks/README.md), never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = [
    "forward_overhead",
    "construct_first_forward",
    "build_scaling",
    "sharded_init",
    "materialize_throughput",
]
RATIO_LINE = re.compile(r"^ratio .+: \d+\.\d+", re.MULTILINE)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_prints_a_ratio(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert load(name).main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert RATIO_LINE.search(out), out


def test_scripts_leave_the_thread_count_alone(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    load("build_scaling").main(["--quick"])
    capsys.readouterr()
    assert torch.get_num_threads() == before


# The figures benchmarks/run.py promises (issue 11), whatever else it adds.
FIGURES = (
    "forward_ratio_vs_eager",
    "lenet_forward_ratio_vs_eager",
    "first_call_ratio_vs_eager",
    "lazy_first_call_ratio_vs_eager",
    "lenet_first_call_ratio_vs_eager",
    "lazy_lenet_first_call_ratio_vs_eager",
    "first_use_ratio_vs_eager",
    "lazy_first_use_ratio_vs_eager",
    "build_10000_layers_s",
    "build_scaling_exponent",
    "meta_build_70b_s",
    "meta_build_70b_peak_rss_mib",
    "materialize_ratio_vs_eager",
    "materialize_parallel_ratio_vs_eager",
    "sharded_exact_ratio_vs_single",
    "sharded_exact_peak_extra_ratio_vs_largest_tensor",
    "rnn_build_ratio_vs_eager",
    "import_overhead_s",
    "import_overhead_mib",
)


def test_run_gives_every_figure_as_a_finite_positive_number(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    missing = [key for key in FIGURES if key not in figures]
    assert not missing, missing
    for key, value in figures.items():
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        # A peak-memory excess may round to nothing; every other figure is a time or a ratio.
        assert value >= 0 if "peak_extra" in key else value > 0, (key, value)
    for key in FIGURES:  # the Markdown table names each figure
        assert f"| `{key}` |" in done.stdout
