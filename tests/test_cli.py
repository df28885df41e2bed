"""The ``deferinit`` command line and its ``demo`` story."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deferinit import cli
from deferinit._present._demo import run_demo

FORWARD_HEADING = "=== 3. The first forward"
MISMATCH = "ShapeMismatchError: Linear layer '0' was built for in_features=20"


@pytest.fixture(scope="module")
def demo_output() -> str:
    """What ``deferinit demo`` prints, through ``main`` as the console script runs it."""
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = cli.main(["demo"])
    assert code == 0
    return capture.getvalue()


def _section(text: str, number: int) -> str:
    start = text.index(f"=== {number}. ")
    end = text.find(f"=== {number + 1}. ", start)
    return text[start:] if end == -1 else text[start:end]


def test_demo_before_build_shows_unknown_sizes(demo_output: str) -> None:
    before = _section(demo_output, 1)
    assert "Linear(in_features=?, out_features=256, bias=True)" in before
    assert "Linear(in_features=?, out_features=10, bias=True)" in before
    assert "0.weight <UninitializedParameter>" in before
    assert "(False, ['0', '2'])" in before  # di.is_built, di.pending


def test_demo_initializer_runs_at_first_forward_not_at_initialize(demo_output: str) -> None:
    forward = demo_output.index(FORWARD_HEADING)
    assert "Init Linear" not in demo_output[:forward]
    section = _section(demo_output, 3)
    first = section.index("Init Linear weight (256, 20)")
    second = section.index("Init Linear weight (10, 256)")
    assert first < second < section.index("torch.Size([2, 10])")
    assert demo_output.count("Init Linear") == 2  # once per layer, never again


def test_demo_after_build_is_eager_torch(demo_output: str) -> None:
    after = _section(demo_output, 4)
    assert "Linear(in_features=20, out_features=256, bias=True)" in after
    assert "Linear(in_features=256, out_features=10, bias=True)" in after
    assert "0.weight (256, 20)" in after
    assert "(<class 'torch.nn.modules.linear.Linear'>, True)" in after
    assert "torch.Size([5, 10])" in _section(demo_output, 5)


def test_demo_reports_the_mismatch_with_layer_name_sizes_and_fix(demo_output: str) -> None:
    mismatch = _section(demo_output, 6)
    assert MISMATCH in mismatch
    assert "shape (3, 30)" in mismatch
    assert "in_features=30" in mismatch
    assert "di.reset" in mismatch


def test_demo_explicit_size_builds_at_once(demo_output: str) -> None:
    explicit = _section(demo_output, 7)
    assert "Linear(in_features=20, out_features=256, bias=True)" in explicit
    assert "(True, True)" in explicit


def test_demo_is_deterministic_and_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = io.StringIO(), io.StringIO()
    run_demo(first)
    run_demo(second)
    assert first.getvalue() == second.getvalue()
    assert torch.equal(torch.rand(3), expected)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(cli.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "deferinit", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
        check=False,
    )


def test_python_dash_m_deferinit_demo() -> None:
    result = _run("demo")
    assert result.returncode == 0, result.stderr
    assert MISMATCH in result.stdout
    assert "延后初始化" in result.stdout


def test_unknown_subcommand_exits_2_with_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith("deferinit: error:")
    assert "invalid choice: 'bogus'" in errors[0]


def test_unknown_subcommand_exits_2_as_a_process() -> None:
    result = _run("bogus")
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr
    assert result.stdout == ""


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err
