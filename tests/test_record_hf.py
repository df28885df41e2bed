"""Hugging Face transformers models from tiny configs, bitwise equal to eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from deferinit._record import deferred_init
from test_record_support import (
    differing,
    materialize_recorded,
    recorded_and_eager,
    tiny_llama_config,
)

transformers = pytest.importorskip("transformers")


def llama() -> nn.Module:
    model: nn.Module = transformers.LlamaForCausalLM(tiny_llama_config(transformers))
    return model


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model: nn.Module = transformers.BertModel(config)
    return model


def test_llama_with_tied_embeddings_is_bitwise_eager() -> None:
    eager, model = recorded_and_eager(llama)
    assert differing(eager, model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 7))
    assert torch.equal(eager(ids).logits, model(ids).logits)


def test_bert_is_bitwise_eager_buffers_included() -> None:
    eager, model = recorded_and_eager(bert)
    assert differing(eager, model) == []
    assert {n for n, _ in model.named_buffers()} >= {"embeddings.position_ids"}
    ids = torch.randint(0, 96, (2, 7))
    eager.eval(), model.eval()
    assert torch.equal(eager(ids).last_hidden_state, model(ids).last_hidden_state)


def test_llama_optimizer_made_before_materialize_trains_all_parameters() -> None:
    model: Any = deferred_init(llama)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    materialize_recorded(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (2, 7))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p)] == []


def test_vit_with_trunc_normal_is_bitwise_eager_even_recorded_under_another_seed() -> None:
    # HF ViT initializes with trunc_normal_, whose rejection loop reads random values.
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    eager = transformers.ViTModel(config)
    torch.manual_seed(5)  # bounds of +-2 with std 0.02: no rejection under any seed
    model: Any = deferred_init(transformers.ViTModel, config)
    torch.manual_seed(0)
    materialize_recorded(model)
    assert differing(eager, model) == []


def test_from_config_with_a_dtype_is_bitwise_eager() -> None:
    # from_config(dtype=...) changes the default dtype around construction.
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    auto = transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    eager = auto.from_config(config, dtype=torch.bfloat16)
    model: Any = deferred_init(auto.from_config, config, dtype=torch.bfloat16)
    torch.manual_seed(0)
    materialize_recorded(model)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert differing(eager, model) == []
