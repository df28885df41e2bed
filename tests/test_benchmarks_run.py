"""The benchmark scripts run (``--quick``) and report their ratios.

Only that they run: timings are read by people from the scripts' output
(benchmarks/README.md), never asserted here.
"""

from __future__ import annotations

import importlib.util
import re
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
