"""A state dict saved before the build (placeholders, no values) loaded into a
built model (docs/design.md §3.7, errors name the layer): both load paths name the
key and the layer, say the checkpoint holds placeholders saved before the build,
and give the fix; the model keeps its values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _built() -> nn.Sequential:
    m = nn.Sequential(nn.Identity(), dnn.Linear(4))
    m(torch.randn(2, 6))
    return m


def _unbuilt_state() -> dict[str, torch.Tensor]:
    return nn.Sequential(nn.Identity(), dnn.Linear(4)).state_dict()


def test_di_load_names_the_key_and_the_layer() -> None:
    m = _built()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(
        di.DeferredInitError,
        match=r"1\.weight \(Linear layer '1'\): the checkpoint holds a placeholder \(saved "
        r"before the layer was built",
    ):
        di.load_state_dict(m, _unbuilt_state())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_torch_load_names_the_key_and_the_layer() -> None:
    m = _built()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(di.NotBuiltError) as info:
        m.load_state_dict(_unbuilt_state())
    text = str(info.value)
    assert "Linear layer '1'" in text and "'1.weight'" in text
    assert "saved before the layer was built" in text
    assert "save the checkpoint after the build" in text and "unbuilt model" in text
    assert "di.initialize" not in text
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
