"""``di.deferred_init`` + ``di.materialize``: the recorded parts replay first, in
program order, the rest is filled as before, and the whole is all or nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit._record import deferred_init
from deferinit._record._deferred_init import RECORD_KEY
from test_record_support import SmallResNet, differing, tiny_llama_config


def test_deferred_init_is_public() -> None:
    assert vars(di)["deferred_init"] is deferred_init
    assert "deferred_init" in di.__all__


def test_materialize_replays_a_recorded_resnet_bitwise() -> None:
    torch.manual_seed(0)
    eager = SmallResNet()
    model: Any = deferred_init(SmallResNet)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    before = model.fc.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.fc.weight)


def test_materialize_replays_modules_without_reset_parameters() -> None:
    class Scale(nn.Module):  # like HF's RMSNorm: no reset_parameters
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4) * 2)

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 4), Scale())
    model: Any = deferred_init(lambda: nn.Sequential(nn.Linear(4, 4), Scale()))
    torch.manual_seed(0)
    assert differing(eager, di.materialize(model)) == []


def test_recorded_and_meta_declared_parts_fill_together() -> None:
    recorded: Any = deferred_init(nn.Linear, 3, 3)
    with torch.device("meta"):
        plain = nn.Linear(3, 2)
    model = nn.Sequential(recorded, plain)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    torch.manual_seed(0)
    with pytest.warns(di.UnrecordedInitWarning, match=r"materialize: 1 \(Linear\): declared"):
        assert differing(eager, di.materialize(model)) == []  # names the plain part only


def test_seed_and_dtype_reach_the_replay() -> None:
    state = torch.get_rng_state()
    a: Any = di.materialize(deferred_init(SmallResNet), seed=5, dtype=torch.float64)
    b: Any = di.materialize(deferred_init(SmallResNet), seed=5, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.fc.weight.dtype == torch.float64
    assert differing(a, b) == []


# A layer declared on meta on purpose; the warning is pinned in test_unrecorded_init.py.
@pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")
def test_a_later_failure_puts_the_replayed_tensors_back_on_meta() -> None:
    class Broken(nn.Linear):
        armed = False

        def reset_parameters(self) -> None:
            if Broken.armed:
                raise RuntimeError("broken init")
            super().reset_parameters()

    recorded: Any = deferred_init(nn.Linear, 3, 3)
    weight = recorded.weight
    with torch.device("meta"):
        broken = Broken(3, 2)
    Broken.armed = True
    model = nn.Sequential(recorded, broken)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="broken init"):
        di.materialize(model)
    assert recorded.weight is weight and weight.is_meta
    assert RECORD_KEY in recorded.__dict__
    assert torch.equal(torch.get_rng_state(), state)
    model[1] = nn.Linear(3, 2, device="meta")
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    torch.manual_seed(0)
    assert differing(eager, di.materialize(model)) == []
    assert recorded.weight is weight


def test_hf_llama_materializes_bitwise_through_di_materialize() -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config(transformers)
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(config)
    model: Any = deferred_init(transformers.LlamaForCausalLM, config)
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight


# A layer declared on meta on purpose; the warning is pinned in test_unrecorded_init.py.
@pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")
def test_seed_gives_the_same_values_recorded_or_declared_on_meta() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Conv2d(2, 3, 3))

    with torch.device("meta"):
        declared = factory()
    di.materialize(declared, seed=5)
    recorded = di.materialize(deferred_init(factory), seed=5)
    assert differing(declared, recorded) == []
