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
from deferinit._present._demo import STEPS, run_demo

MISMATCH = "ShapeMismatchError: Linear layer '0' was built for in_features=20"


@pytest.fixture(scope="module")
def demo_output() -> str:
    """What ``deferinit demo --lang en`` prints, through ``main`` as the console script runs it."""
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = cli.main(["demo", "--lang", "en"])
    assert code == 0
    return capture.getvalue()


def _number(title: str) -> int:
    return next(n for n, step in enumerate(STEPS, 1) if step.en[0] == title)


def _section(text: str, title: str) -> str:
    number = _number(title)
    start = text.index(f"=== {number}. ")
    end = text.find(f"=== {number + 1}. ", start)
    return text[start:] if end == -1 else text[start:end]


def test_demo_shows_why_sizes_are_unknown_with_torchs_own_error(demo_output: str) -> None:
    why = _section(demo_output, "Why sizes are unknown when a model is written")
    assert "nn.Linear(16 * 5 * 5, 120)" in why
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x576 and 400x120)" in why


def test_demo_before_build_shows_unknown_sizes(demo_output: str) -> None:
    before = _section(demo_output, "An MLP without input sizes")
    assert "Linear(in_features=?, out_features=256, bias=True)" in before
    assert "Linear(in_features=?, out_features=10, bias=True)" in before
    inspect = _section(demo_output, "Inspecting it before the first forward")
    assert "weight (256, ?), bias (256,)" in inspect
    assert "<UninitializedParameter>" in inspect
    assert "['0.weight', '0.bias', '2.weight', '2.bias']" in inspect
    assert "(False, ['0', '2'])" in inspect


def test_demo_initializer_runs_at_first_forward_not_at_initialize(demo_output: str) -> None:
    forward = demo_output.index(f"=== {_number('The first forward')}. ")
    assert "Init 0.weight" not in demo_output[:forward]
    section = _section(demo_output, "The first forward")
    first = section.index("Init 0.weight (256, 20)")
    second = section.index("Init 2.weight (10, 256)")
    assert first < second < section.index("torch.Size([2, 10])")


def test_demo_after_build_is_eager_torch(demo_output: str) -> None:
    after = _section(demo_output, "Sizes after the first forward")
    assert "Linear(in_features=20, out_features=256, bias=True)" in after
    assert "Linear(in_features=256, out_features=10, bias=True)" in after
    assert "(True, True, True)" in after  # torch's class, the same object, built
    assert "torch.Size([5, 10])" in _section(demo_output, "A new batch size works")


def test_demo_reports_the_mismatch_with_layer_name_sizes_and_fix(demo_output: str) -> None:
    mismatch = _section(demo_output, "A new feature size is an error that says what to do")
    assert MISMATCH in mismatch
    assert "shape (2, 30)" in mismatch
    assert "in_features=30" in mismatch
    assert "di.reset" in mismatch
    again = _section(demo_output, "di.reset: infer again")
    assert again.index("Init 0.weight (256, 30)") < again.index("torch.Size([2, 10])")


def test_demo_explicit_size_builds_at_once(demo_output: str) -> None:
    explicit = _section(demo_output, "An explicit size skips the deferral")
    assert "(Linear(in_features=20, out_features=256, bias=True), True, True)" in explicit


def test_demo_lenet_infers_both_resolutions(demo_output: str) -> None:
    lenet = _section(demo_output, "LeNet at 28x28, then at 32x32")
    assert "28x28: Linear(in_features=400, out_features=120, bias=True)" in lenet
    assert "32x32: Linear(in_features=576, out_features=120, bias=True)" in lenet


def test_demo_custom_block_becomes_its_class(demo_output: str) -> None:
    block = _section(demo_output, "A custom block with di.defer")
    assert "MLP(in_features=?, hidden=256, out_features=10)" in block
    assert "True, Linear(in_features=20, out_features=256, bias=True))" in block


def test_demo_meta_build_and_recorded_model_equal_eager(demo_output: str) -> None:
    meta = _section(demo_output, "A model larger than memory")
    assert "Parameter bytes: float32 34,362,884,136 (32.0 GiB)" in meta
    assert meta.rstrip().endswith("True")
    recorded = _section(demo_output, "Any model: di.deferred_init")
    assert "device(type='meta')" in recorded
    assert recorded.rstrip().endswith("True")


def test_demo_adopts_lazy_modules(demo_output: str) -> None:
    adopted = _section(demo_output, "Adopting existing torch.nn.Lazy* code")
    assert "Linear(in_features=?, out_features=256, bias=True)" in adopted
    assert "(Linear(in_features=20, out_features=256, bias=True), True)" in adopted


def test_demo_every_error_shown_is_the_one_the_step_expects(demo_output: str) -> None:
    assert "this is a bug" not in demo_output
    assert demo_output.count("Error: ") == sum(1 for step in STEPS if step.raises)


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
    result = _run("demo", "--lang", "en")
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
