"""examples/load_checkpoint.py runs end to end in its own interpreter: an eager
checkpoint saved as safetensors loads into an unbuilt deferred model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "load_checkpoint.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.is_file(), SCRIPT
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, *{list(args)!r}]\n"
        f"main = runpy.run_path({str(SCRIPT)!r})['main']\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_load_checkpoint_example_passes_every_check() -> None:
    result = _run()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"^checkpoint: convnet\.safetensors \(\d+ bytes\)$", out, re.MULTILINE), out
    assert re.search(r"^before: built=False, pending=\['0', '1', '5'\]$", out, re.MULTILINE)
    refused = re.search(r"^refused: (.*)$", out, re.MULTILINE)
    assert refused is not None, out
    assert "5.weight" in refused.group(1) and "head.weight" in refused.group(1)
    assert "Conv2d(3, 8, kernel_size=(3, 3)" in out
    assert "Linear(in_features=128, out_features=10, bias=True)" in out
    checks = re.findall(r"^(.+): (True|False)$", out, re.MULTILINE)
    assert len(checks) >= 10, out
    assert all(ok == "True" for _, ok in checks), out
    assert re.search(r"^all checks passed: True$", out, re.MULTILINE)


def test_load_checkpoint_example_takes_argv() -> None:
    result = _run("--channels", "1", "--classes", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Conv2d(1, 8, kernel_size=(3, 3)" in result.stdout
    assert "Linear(in_features=128, out_features=3, bias=True)" in result.stdout
    assert "all checks passed: True" in result.stdout
