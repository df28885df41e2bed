"""FSDP2: a meta-built model, sharded, then materialized on two gloo processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TwoRanks = Callable[[Path], str]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fsdp_materialize.py"


def test_sharded_materialize_equals_single_process_and_trains(two_ranks: TwoRanks) -> None:
    out = two_ranks(EXAMPLE)
    assert "world size: 2" in out
    assert "sharded: True" in out
    assert "equal to single process: True" in out
    assert "seed mode equal to single process: True" in out
    assert "training step: True" in out
    held = next(line for line in out.splitlines() if line.startswith("rank 0 holds"))
    _, _, _, local_text, _, full_text, _ = held.split()
    local, full = int(local_text), int(full_text)
    assert 0 < local < full  # each rank allocates only its shard
