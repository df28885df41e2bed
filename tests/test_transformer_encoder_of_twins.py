"""torch's TransformerEncoder/Decoder stacking twin layers: the placeholder and its
holders answer the plain attributes torch reads before any layer runs."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._declare._layout import Layout


def _encoder(twin: bool) -> nn.TransformerEncoder:
    layer: Any
    if twin:
        layer = dnn.TransformerEncoderLayer(nhead=4, dim_feedforward=64, batch_first=True)
    else:
        layer = nn.TransformerEncoderLayer(16, nhead=4, dim_feedforward=64, batch_first=True)
    # enable_nested_tensor=False: torch warns about a layer that is not its own class.
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def test_encoder_of_twins_runs_its_first_forward() -> None:
    enc = _encoder(twin=True)
    x = torch.randn(2, 5, 16)
    assert enc(x).shape == (2, 5, 16)
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in enc.layers)
    assert enc.layers[0].self_attn.embed_dim == 16
    assert enc.state_dict().keys() == _encoder(twin=False).state_dict().keys()


def test_encoder_of_twins_builds() -> None:
    enc = _encoder(twin=True)
    x = torch.randn(2, 5, 16)
    di.build(enc, x)
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in enc.layers)
    assert enc(x).shape == (2, 5, 16)
    assert enc.state_dict().keys() == _encoder(twin=False).state_dict().keys()


def test_decoder_of_twins_runs_and_builds() -> None:
    def decoder() -> nn.TransformerDecoder:
        layer: Any = dnn.TransformerDecoderLayer(nhead=2, dim_feedforward=32)
        return nn.TransformerDecoder(layer, num_layers=2)

    tgt, memory = torch.randn(3, 2, 8), torch.randn(4, 2, 8)
    assert decoder()(tgt, memory).shape == (3, 2, 8)
    built = decoder()
    di.build(built, tgt, memory)
    assert all(type(layer) is nn.TransformerDecoderLayer for layer in built.layers)


def test_placeholder_answers_plain_attributes_as_the_built_layer() -> None:
    layer = dnn.TransformerEncoderLayer(nhead=4, norm_first=True, batch_first=True)
    eager = nn.TransformerEncoderLayer(8, nhead=4, norm_first=True, batch_first=True)
    for name in ("norm_first", "activation_relu_or_gelu"):
        assert getattr(layer, name) == getattr(eager, name)
    for name in ("batch_first", "_qkv_same_embed_dim", "num_heads"):
        assert getattr(layer.self_attn, name) == getattr(eager.self_attn, name)
    assert layer.dropout1.p == eager.dropout1.p
    assert layer.norm1.eps == eager.norm1.eps
    assert isinstance(layer, di.Deferred)


def test_size_dependent_attribute_is_refused_naming_layer_and_attribute() -> None:
    layer = dnn.TransformerEncoderLayer(nhead=4)
    with pytest.raises(di.NotBuiltError, match=r"TransformerEncoderLayer.*self_attn\.head_dim"):
        _ = layer.self_attn.head_dim
    assert not hasattr(layer.self_attn, "embed_dim")
    # kdim is inferred for the attention twin: whether q, k and v share a size is not known.
    attention = dnn.MultiheadAttention(num_heads=2)
    with pytest.raises(di.NotBuiltError, match=r"MultiheadAttention.*_qkv_same_embed_dim"):
        _ = attention._qkv_same_embed_dim
    assert attention.batch_first is False


def test_unknown_attribute_is_still_an_attribute_error() -> None:
    layer = dnn.TransformerEncoderLayer(nhead=4)
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = layer.no_such_thing
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = layer.self_attn.no_such_thing


def test_twin_layers_start_equal_as_eagers_copies() -> None:
    # Eager deep-copies one constructed layer, so all its layers start equal; the
    # twin's copies are placeholders built in turn, from the draw of the first.
    torch.manual_seed(0)
    enc = _encoder(twin=True)
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    di.build(enc, x)
    torch.manual_seed(0)
    eager = _encoder(twin=False)
    for i in range(len(eager.layers)):
        built, same = enc.layers[i].state_dict(), eager.layers[i].state_dict()
        assert all(torch.equal(built[k], same[k]) for k in same), i


def test_declaring_and_first_forward_construct_nothing_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only a read that would otherwise fail pays for the meta constructions.
    def refused(*args: Any) -> Any:
        raise AssertionError("constructed for an attribute read")

    monkeypatch.setattr(Layout, "attribute", refused)
    layer = dnn.TransformerEncoderLayer(nhead=2, dim_feedforward=16)
    _ = inspect.signature(layer)
    assert layer(torch.randn(3, 2, 8)).shape == (3, 2, 8)
    attention = dnn.MultiheadAttention(num_heads=2)
    x = torch.randn(3, 2, 8)
    attention(x, x, x)
