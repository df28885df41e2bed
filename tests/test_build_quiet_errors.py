"""An eager layer that rejects the examples in the shape-only pass: one clean
deferinit error naming the layer, and nothing from torch's fake-tensor logger on
stderr (it logs a traceback for every meta kernel that fails)."""

from __future__ import annotations

import contextlib
import logging
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import deferinit as di
from deferinit import cli
from deferinit import nn as dnn

FAKE_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")
REJECTED = (
    r"(?s)Linear layer '0' rejects the input the examples give it.*"
    r"Linear\(in_features=5, out_features=3, bias=True\) got a float32 tensor of shape \(2, 20\).*"
    r"reduction dim.*Nothing was built\. Fix: "
)


def make() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 3), dnn.Linear(2))


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _kept() -> Iterator[list[str]]:
    """The messages the fake-tensor logger hands its handlers (torch's logger does
    not propagate, so pytest's caplog would not see them)."""
    handler = _Kept()
    FAKE_LOGGER.addHandler(handler)
    try:
        yield handler.messages
    finally:
        FAKE_LOGGER.removeHandler(handler)


def _logger_config() -> tuple[int, list[logging.Handler], bool, list[object], bool]:
    return (
        FAKE_LOGGER.level,
        list(FAKE_LOGGER.handlers),
        FAKE_LOGGER.propagate,
        list(FAKE_LOGGER.filters),
        FAKE_LOGGER.disabled,
    )


def test_build_rejected_by_an_eager_layer_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    before = _logger_config()
    net = make()
    with pytest.raises(di.DeferredInitError, match=REJECTED) as info:
        di.build(net, (2, 20))
    assert isinstance(info.value, RuntimeError)
    assert capfd.readouterr().err == ""
    assert _logger_config() == before
    assert di.pending(net) == ["1"]
    assert di.build(net, (2, 5)) is net  # a corrected call succeeds
    assert net[1].in_features == 3


def test_summary_rejected_by_an_eager_layer_prints_nothing(
    capfd: pytest.CaptureFixture[str],
) -> None:
    before = _logger_config()
    with pytest.raises(di.DeferredInitError, match=REJECTED):
        di.summary(make(), (2, 20))
    assert capfd.readouterr().err == ""
    assert _logger_config() == before


def test_a_layer_after_a_deferred_one_is_named() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(
        di.DeferredInitError,
        match=r"(?s)Linear layer '2' rejects .*in_features=6.* got a float32 tensor "
        r"of shape \(2, 4\)",
    ):
        di.build(net, (2, 5))
    assert di.pending(net) == ["0"]


def test_cli_summary_says_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "quiet_cli_mod.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn
            from deferinit import nn as dnn
            def make(): return nn.Sequential(nn.Linear(5, 3), dnn.Linear(2))
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["summary", f"{path}:make", "--input-shape", "2,20"])
    captured = capfd.readouterr()
    assert (code, captured.out) == (2, "")
    assert len(captured.err.splitlines()) == 1, captured.err
    assert "Linear layer '0' rejects" in captured.err


def test_the_logger_still_logs_outside_the_pass(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(di.DeferredInitError):
        di.build(make(), (2, 20))
    with _kept() as messages:
        FAKE_LOGGER.error("after the pass")
    assert messages == ["after the pass"]
    capfd.readouterr()  # torch's own handler printed it too


def test_another_threads_records_are_kept_during_the_pass(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The pass drops only its own thread's records: a record another thread logs
    while a pass runs (here: from a forward pre-hook that waits for it) is kept."""
    logged = threading.Event()

    def log_from_another_thread() -> None:
        FAKE_LOGGER.error("from another thread")
        logged.set()

    def hook(module: nn.Module, args: tuple[object, ...]) -> None:
        if not isinstance(args[0], FakeTensor):
            return  # the pass runs on meta first, where nothing is logged
        thread = threading.Thread(target=log_from_another_thread)
        thread.start()
        thread.join()

    net = make()
    net[0].register_forward_pre_hook(hook)
    with _kept() as messages, pytest.raises(di.DeferredInitError):
        di.build(net, (2, 20))
    assert logged.is_set()
    assert "from another thread" in messages
    assert not any("failed while attempting" in m for m in messages)
    assert "failed while attempting" not in capfd.readouterr().err


def test_other_errors_are_unchanged() -> None:
    """A deferred layer's own error stays deferinit's, as before."""
    with pytest.raises(di.InferenceError, match=r"Linear layer '0'"):
        di.build(nn.Sequential(dnn.Linear(3)), torch.Size([]))
