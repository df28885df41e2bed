"""di.load_state_dict reads binary file-like objects, and tells a file's format by
its content (the extension only breaks a tie); every refusal is a DeferredInitError."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _saved() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(nn.Linear(4, 3).state_dict())


def _check(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    weight, bias = model.weight, model.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    assert torch.equal(weight, sd["weight"]) and torch.equal(bias, sd["bias"])


def test_torch_bytes_io() -> None:
    sd = _saved()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    model = dnn.Linear(3)
    assert di.load_state_dict(model, buffer) == nn.Linear(4, 3).load_state_dict(sd)
    _check(model, sd)


def test_safetensors_bytes_io() -> None:
    sd = _saved()
    model = dnn.Linear(3)
    di.load_state_dict(model, io.BytesIO(save(sd)))
    _check(model, sd)


def test_open_binary_file(tmp_path: Path) -> None:
    sd = _saved()
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    model = dnn.Linear(3)
    with path.open("rb") as file:
        di.load_state_dict(model, file)
    _check(model, sd)


def test_safetensors_under_another_extension(tmp_path: Path) -> None:
    sd = _saved()
    path = tmp_path / "w.st"
    save_file(sd, path)
    model = dnn.Linear(3)
    di.load_state_dict(model, path)
    _check(model, sd)


def test_torch_file_named_safetensors(tmp_path: Path) -> None:
    sd = _saved()
    path = tmp_path / "w.safetensors"
    torch.save(sd, path)
    model = dnn.Linear(3)
    di.load_state_dict(model, path)
    _check(model, sd)


def test_legacy_torch_file(tmp_path: Path) -> None:
    sd = _saved()
    path = tmp_path / "w.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    model = dnn.Linear(3)
    di.load_state_dict(model, path)
    _check(model, sd)


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.txt"
    path.write_text("hello")
    model = dnn.Linear(3)
    with path.open() as file, pytest.raises(di.DeferredInitError, match="binary"):
        di.load_state_dict(model, file)  # type: ignore[arg-type]
    assert di.pending(model)


def test_corrupt_bytes_are_a_deferred_init_error() -> None:
    model = dnn.Linear(3)
    with pytest.raises(di.DeferredInitError, match="cannot be read"):
        di.load_state_dict(model, io.BytesIO(b"not a checkpoint at all"))
    assert di.pending(model)


def test_other_source_is_a_deferred_init_error() -> None:
    with pytest.raises(di.DeferredInitError, match="state dict"):
        di.load_state_dict(dnn.Linear(3), 42)  # type: ignore[arg-type]
