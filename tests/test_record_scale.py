"""Scale: the 70B-shaped decoder (plain torch.nn layers, explicit sizes) records in a
fresh interpreter without allocating its parameters (its time: benchmarks/record_cost.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_a_70b_shaped_decoder_records_on_meta_in_under_1_gib() -> None:
    # Its time is measured by benchmarks/record_cost.py, never asserted here.
    code = "import test_record_support as s; s.record_70b()"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=120,
        check=True,
    ).stdout
    assert "parameters: 70.55e9, devices: ['meta']" in out
    peak = float(re.search(r"peak RSS: (\d+) MiB", out).group(1))  # type: ignore[union-attr]
    assert peak < 1024, out
