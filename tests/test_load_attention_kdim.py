"""A MultiheadAttention checkpoint with kdim/vdim other than embed_dim (separate
q/k/v_proj_weight keys) loads into an unbuilt twin on both paths (docs/design.md
§3.7): kdim and vdim are read off k_proj_weight and v_proj_weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_separate_projections_load_into_unbuilt_twin(loader: str) -> None:
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(12, 3, kdim=5, vdim=7)
    m = dnn.MultiheadAttention(num_heads=3)
    if loader == "di":
        result = di.load_state_dict(m, eager.state_dict())
    else:
        result = m.load_state_dict(eager.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert isinstance(m, nn.MultiheadAttention)
    assert (m.embed_dim, m.kdim, m.vdim) == (12, 5, 7)
    for key, value in eager.state_dict().items():
        assert torch.equal(m.state_dict()[key], value), key
    q, k, v = torch.randn(4, 2, 12), torch.randn(4, 2, 5), torch.randn(4, 2, 7)
    assert torch.equal(m(q, k, v)[0], eager(q, k, v)[0])


@pytest.mark.parametrize("loader", ["di", "torch"])
def test_packed_projection_still_loads(loader: str) -> None:
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(12, 3)
    m = dnn.MultiheadAttention(num_heads=3)
    if loader == "di":
        di.load_state_dict(m, eager.state_dict())
    else:
        m.load_state_dict(eager.state_dict())
    assert isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim
    assert torch.equal(m.in_proj_weight, eager.in_proj_weight)
