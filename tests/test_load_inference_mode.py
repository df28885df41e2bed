"""Loading under ``torch.inference_mode()`` keeps ordinary parameters, as eager torch's
``load_state_dict`` does: trainable, and an optimizer can step them afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _ordinary(model: nn.Sequential) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_inference(), name
    loss = model(torch.randn(2, 6)).sum()
    loss.backward()
    assert model.get_parameter("0.weight").grad is not None
    torch.optim.SGD(model.parameters(), lr=0.1).step()


@pytest.mark.parametrize("kind", ["dict", "pt", "safetensors"])
@pytest.mark.parametrize("state", ["unbuilt", "meta", "built"])
@pytest.mark.parametrize("loader", ["di", "torch"])
def test_inference_mode_load_keeps_ordinary_tensors(
    tmp_path: Path, kind: str, state: str, loader: str
) -> None:
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).state_dict()
    source: object = saved
    if kind == "pt":
        source = tmp_path / "c.pt"
        torch.save(saved, source)
    elif kind == "safetensors":
        safetensors = pytest.importorskip("safetensors.torch")
        source = tmp_path / "c.safetensors"
        safetensors.save_file(saved, str(source))
    if loader == "torch" and (kind != "dict" or state == "meta"):
        return  # torch's own loader takes a dict, and copies into meta as a no-op
    model = nn.Sequential(dnn.Linear(4), dnn.BatchNorm1d())
    if state == "built":
        model(torch.randn(2, 6))
    elif state == "meta":
        di.build(model, torch.randn(2, 6), device="meta")
    with torch.inference_mode():
        if loader == "di":
            di.load_state_dict(model, source)  # type: ignore[arg-type]
        else:
            model.load_state_dict(saved)
    assert torch.equal(model.get_parameter("0.weight").detach(), saved["0.weight"])
    _ordinary(model)


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_inference_mode_partial_load_keeps_ordinary_tensors(loader: str) -> None:
    weight = torch.randn(4, 6)
    model = nn.Sequential(dnn.Linear(4))
    with torch.inference_mode():
        if loader == "di":
            di.load_state_dict(model, {"0.weight": weight}, strict=False)
        else:
            model.load_state_dict({"0.weight": weight}, strict=False)
    assert torch.equal(model.get_parameter("0.weight").detach(), weight)
    _ordinary(model)
