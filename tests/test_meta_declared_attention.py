"""Attention declared under ``torch.device("meta")`` is filled by its own
``_reset_parameters`` (``nn.MultiheadAttention`` has no ``reset_parameters``),
after its submodules, as eager's ``__init__`` runs it (docs/decisions.md,
*Modules declared on meta*)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di

pytestmark = pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")

Factory = Callable[[], nn.Module]

FACTORIES: dict[str, Factory] = {
    "attention": lambda: nn.MultiheadAttention(16, 4),
    "attention-kdim-bias-kv": lambda: nn.MultiheadAttention(
        16, 4, add_bias_kv=True, kdim=8, vdim=8
    ),
    "encoder-layer": lambda: nn.TransformerEncoderLayer(16, 4, 32),
    "decoder-layer-between-linears": lambda: nn.Sequential(
        nn.Linear(3, 3), nn.TransformerDecoderLayer(16, 4, 32), nn.Linear(2, 2)
    ),
    # No tensor of its own; its _reset_parameters re-draws every submodule's weights.
    "transformer": lambda: nn.Transformer(8, 2, 1, 1, 16, batch_first=True),
    "transformer-inside": lambda: nn.Sequential(
        nn.Linear(2, 2), nn.Transformer(8, 2, 1, 1, 16, batch_first=True)
    ),
}


def _on_meta(make: Factory) -> nn.Module:
    with torch.device("meta"):
        return make()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_attention_declared_on_meta_materializes_as_eager(make: Factory) -> None:
    torch.manual_seed(0)
    eager = make()
    model = _on_meta(make)
    torch.manual_seed(0)
    di.materialize(model)
    assert _same_state(model, eager)


def test_attention_declared_on_meta_is_named_in_the_warning() -> None:
    model = _on_meta(FACTORIES["attention"])
    with pytest.warns(di.UnrecordedInitWarning, match=r"<root> \(MultiheadAttention\)"):
        di.materialize(model)


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_seeded_attention_does_not_depend_on_threads(make: Factory) -> None:
    before = torch.get_num_threads()
    made = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            made.append(di.materialize(_on_meta(make), seed=3))
    finally:
        torch.set_num_threads(before)
    assert _same_state(*made)
    biases = [v for k, v in made[0].state_dict().items() if k.endswith("out_proj.bias")]
    assert biases and all(not b.any() for b in biases)  # zeroed, as its init intends


def test_seeded_attention_submodule_first_equals_the_whole() -> None:
    def attention() -> nn.MultiheadAttention:
        with torch.device("meta"):
            return nn.MultiheadAttention(16, 4)

    whole = di.materialize(attention(), seed=5)
    parts = attention()
    di.materialize(parts.out_proj, seed=5)  # named "" below itself: not the whole's values
    di.materialize(parts, seed=5)
    assert torch.equal(parts.in_proj_weight, whole.in_proj_weight)
    assert not parts.out_proj.bias.any()  # the attention's own init zeroed it, as in whole
