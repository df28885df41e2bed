"""The examples run end to end. Each runs in its own interpreter, so what it
measures (peak resident memory) is its own and not this test session's.

No timing is asserted here: the bars of DESIGN §5 are measured by the benchmarks.
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
