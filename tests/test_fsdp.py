"""FSDP2: a meta-built model, sharded, then materialized on two gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp_materialize.py"


def test_sharded_materialize_equals_single_process_and_trains() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "world size: 2" in run.stdout
    assert "sharded: True" in run.stdout
    assert "equal to single process: True" in run.stdout
    assert "seed mode equal to single process: True" in run.stdout
    assert "training step: True" in run.stdout
    held = next(line for line in run.stdout.splitlines() if line.startswith("rank 0 holds"))
    _, _, _, local_text, _, full_text, _ = held.split()
    local, full = int(local_text), int(full_text)
    assert 0 < local < full  # each rank allocates only its shard
