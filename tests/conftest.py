"""Shared fixtures: torch is the oracle, so most tests compare two models' state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Generator
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


DeclaredIn = Callable[[torch.dtype, Callable[[], nn.Module]], nn.Module]


def _declared_in(dtype: torch.dtype, make: Callable[[], nn.Module]) -> nn.Module:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return make()
    finally:
        torch.set_default_dtype(before)


@pytest.fixture
def declared_in() -> DeclaredIn:
    """``declared_in(dtype, make)``: ``make()`` under that default dtype, the default
    put back after, whatever happens."""
    return _declared_in


class RefusingInit:
    """An init function for ``Module.apply`` that raises ``RuntimeError("init
    refused")`` until :meth:`stop`: a build that fails after other layers were
    built, then a retry."""

    def __init__(self) -> None:
        self.refusing = True

    def __call__(self, layer: nn.Module) -> None:
        if self.refusing:
            raise RuntimeError("init refused")

    def stop(self) -> None:
        self.refusing = False


@pytest.fixture
def refusing_init() -> RefusingInit:
    return RefusingInit()


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


# -- interrupts raised by the code under test ---------------------------------------------
# Tests raise KeyboardInterrupt inside initializers on purpose. One that escapes its test
# (a regression) must fail that test, not end the session: pytest takes any
# KeyboardInterrupt for the user's Ctrl-C and stops, silently skipping the rest of the
# suite. A real Ctrl-C is told apart by the SIGINT handler below and still stops the run.

_SIGINT = {"received": False}


def _on_sigint(signum: int, frame: object) -> None:
    _SIGINT["received"] = True
    raise KeyboardInterrupt


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except KeyboardInterrupt as error:
        if _SIGINT["received"]:
            raise
        raise AssertionError(
            f"a KeyboardInterrupt escaped {item.nodeid} (raised by the code under test, not Ctrl-C)"
        ) from error
