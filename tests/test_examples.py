"""The examples run end to end. Each runs in its own interpreter, so what it
measures (peak resident memory) is its own and not this test session's.

No timing is asserted here: the bars of docs/design.md §5 are measured by the benchmarks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

LLAMA_70B_PARAMETERS = 70.6e9


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = EXAMPLES / name
    assert script.is_file(), script
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, *{list(args)!r}]\n"
        f"main = runpy.run_path({str(script)!r})['main']\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_llama_70b_builds_on_meta_with_the_llama_3_70b_parameter_count() -> None:
    result = run_example("llama_70b_meta.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout

    count = re.search(r"^parameters: (\d+)", out, re.MULTILINE)
    assert count is not None, out
    assert abs(int(count.group(1)) - LLAMA_70B_PARAMETERS) <= 0.01 * LLAMA_70B_PARAMETERS, out

    # Every parameter and buffer is on meta: nothing was allocated.
    assert re.search(r"^devices: meta$", out, re.MULTILINE), out
    assert re.search(r"^built: True$", out, re.MULTILINE), out
    assert re.search(r"^elapsed: [\d.]+ s", out, re.MULTILINE), out
    assert re.search(r"^peak RSS: \d+ MiB", out, re.MULTILINE), out


def test_llama_example_main_is_importable_and_takes_argv() -> None:
    # A two-block variant through the same entry point: the example's CLI works.
    result = run_example("llama_70b_meta.py", "--layers", "2", "--summary-rows", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    count = re.search(r"^parameters: (\d+)", result.stdout, re.MULTILINE)
    assert count is not None, result.stdout
    per_block = 2 * 8192 + 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    ends = 2 * 128256 * 8192 + 8192
    assert int(count.group(1)) == 2 * per_block + ends
    assert "devices: meta" in result.stdout


def test_compile_and_export_example_matches_eager_compiled_exported_and_onnx() -> None:
    result = run_example("compile_and_export.py")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^built: True$", out, re.MULTILINE), out
    assert re.search(r"^compiled \(fullgraph\) matches eager: True", out, re.MULTILINE), out
    assert re.search(r"^exported matches eager: True", out, re.MULTILINE), out
    # onnx and onnxscript are in the dev extra the tests run with: not skipped here.
    assert re.search(r"^onnx matches eager: True$", out, re.MULTILINE), out


def test_ddp_example_trains_two_ranks_to_equal_parameters() -> None:
    # Run as a script, not through runpy: the spawned ranks pickle rank_main by module.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_train.py"), "--world-size", "2", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "world size: 2 (gloo, CPU)",
        "initial parameters differ across ranks before DDP: True",
        "initial parameters equal across ranks after DDP: True",
        "parameters equal across ranks: True",
        "parameters changed by training: True",
    ):
        assert re.search(rf"^{re.escape(line)}$", out, re.MULTILINE), out
    assert len(re.findall(r"^step \d+: loss [\d.]+", out, re.MULTILINE)) == 2, out
