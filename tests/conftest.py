"""Shared fixtures: torch is the oracle, so most tests compare two models' state."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def _assert_same_state(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, expected in want_state.items():
        actual = got_state[key]
        assert type(actual) is type(expected), key
        assert actual.dtype == expected.dtype, key
        assert actual.shape == expected.shape, key
        assert torch.equal(actual, expected), key
    got_grad = [p.requires_grad for p in got.parameters()]
    assert got_grad == [p.requires_grad for p in want.parameters()]


@pytest.fixture
def assert_same_state() -> AssertSameState:
    """``assert_same_state(got, want)``: same keys in the same order, bitwise-equal
    values of the same dtype and shape, and the same ``requires_grad`` flags."""
    return _assert_same_state


TwoRanks = Callable[[Path], str]


def _two_ranks(script: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*command, "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.fixture
def two_ranks() -> TwoRanks:
    """``two_ranks(script)``: run it on two CPU processes (``torchrun --standalone``,
    which finds its own free port), assert both exit 0, return their stdout."""
    return _two_ranks
