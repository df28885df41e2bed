"""``di.reset`` of a layer carrying a reparametrization (docs/design.md §3.10,
"Nothing lost"): pruning, weight or spectral normalization (new and old style),
``torch.nn.utils.parametrize`` all move the layer's tensors under other names
(``weight_orig``, ``parametrizations.weight.original``) and rebuild ``weight``
from them. Rebuilding the layer from its constructor would drop them, so reset
refuses, before changing anything in the model, and says how to proceed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import deferinit as di
from deferinit import nn as dnn

Apply = Callable[[nn.Module], Any]


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def _old_weight_norm(layer: nn.Module) -> Any:
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(layer)


def _orthogonal(layer: nn.Module) -> Any:
    return parametrizations.orthogonal(layer)


CASES: list[tuple[str, Apply, str]] = [
    ("prune", lambda m: prune.l1_unstructured(m, "weight", amount=0.3), r"prune\.remove"),
    ("weight_norm", parametrizations.weight_norm, "remove_parametrizations"),
    ("old_weight_norm", _old_weight_norm, "remove_weight_norm"),
    ("spectral_norm", parametrizations.spectral_norm, "remove_parametrizations"),
    ("old_spectral_norm", torch.nn.utils.spectral_norm, "remove_spectral_norm"),
    ("orthogonal", _orthogonal, "remove_parametrizations"),
    (
        "register_parametrization",
        lambda m: parametrize.register_parametrization(m, "weight", Double()),
        "remove_parametrizations",
    ),
]
IDS = [c[0] for c in CASES]


def _snapshot(model: nn.Module) -> list[tuple[Any, ...]]:
    return [
        (
            name,
            type(sub),
            [(n, id(t)) for n, t in sub._parameters.items()],
            [(n, id(t)) for n, t in sub._buffers.items()],
            dict(sub._forward_pre_hooks),
            list(sub._modules),
            sub.__dict__.get("_di"),
        )
        for name, sub in model.named_modules()
    ]


@pytest.mark.parametrize(("_id", "apply", "fix"), CASES, ids=IDS)
def test_reset_of_a_reparametrized_root_layer_is_refused_and_changes_nothing(
    _id: str, apply: Apply, fix: str
) -> None:
    layer = dnn.Linear(6)
    x = torch.randn(3, 5)
    layer(x)
    apply(layer)
    layer.eval()  # spectral normalization's power iteration left alone: outputs compared
    before = _snapshot(layer)
    out = layer(x)
    with pytest.raises(di.DeferredInitError, match=rf"Linear layer.*weight.*{fix}.*di\.reset"):
        di.reset(layer)
    assert _snapshot(layer) == before
    assert di.is_built(layer)
    assert torch.equal(layer(x), out)


@pytest.mark.parametrize(("_id", "apply", "fix"), CASES, ids=IDS)
def test_reset_of_a_model_with_a_nested_reparametrized_layer_changes_no_layer(
    _id: str, apply: Apply, fix: str
) -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    x = torch.randn(4, 5)
    net(x)
    apply(net[2])
    net.eval()  # spectral normalization's power iteration left alone: outputs compared
    before = _snapshot(net)
    out = net(x)
    with pytest.raises(di.DeferredInitError, match=rf"Linear layer '2'.*weight.*{fix}"):
        di.reset(net)
    assert _snapshot(net) == before  # layers 0 and 4 were not reset either
    assert di.pending(net) == []
    assert torch.equal(net(x), out)


def test_reset_after_removing_the_pruning_rebuilds_and_pruning_again_works() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    net(torch.rand(4, 5))
    prune.l1_unstructured(net[0], "weight", amount=0.3)
    with pytest.raises(di.DeferredInitError, match=r"prune\.remove\(layer, 'weight'\)"):
        di.reset(net)
    prune.remove(net[0], "weight")
    weight = net[0].weight
    di.reset(net)
    assert di.pending(net) == ["0", "2"]
    assert net(torch.rand(4, 7)).shape == (4, 2)
    assert net[0].weight is weight and weight.shape == (8, 7)
    prune.l1_unstructured(net[0], "weight", amount=0.3)
    assert net(torch.rand(4, 7)).shape == (4, 2)


def test_reset_after_removing_a_parametrization_rebuilds_a_plain_layer() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    net(torch.rand(4, 5))
    parametrizations.weight_norm(net[0])
    parametrize.remove_parametrizations(net[0], "weight")
    weight = net[0].weight
    di.reset(net)
    net(torch.rand(4, 7))
    assert type(net[0]) is nn.Linear and net[0].weight is weight


def test_reset_of_a_reparametrized_submodule_of_a_built_attention_is_refused() -> None:
    mha = dnn.MultiheadAttention(num_heads=2)
    q = torch.randn(3, 2, 4)
    mha(q, q, q)
    prune.random_unstructured(mha.out_proj, "weight", amount=0.5)
    with pytest.raises(di.DeferredInitError, match=r"MultiheadAttention layer.*out_proj\.weight"):
        di.reset(mha)
    assert di.is_built(mha)


def test_reset_keeps_a_parameter_the_user_registered_before_or_after_the_build() -> None:
    layer = dnn.Linear(3)
    before = nn.Parameter(torch.ones(1))
    layer.scale = before
    layer.register_buffer("offsets", torch.zeros(2), persistent=False)
    layer(torch.randn(2, 4))
    after = nn.Parameter(torch.ones(2))
    layer.gain = after
    layer.tag = "kept"
    weight = layer.weight
    di.reset(layer)
    assert di.pending(layer) == [""]
    layer(torch.randn(2, 5))
    assert layer.weight is weight and weight.shape == (3, 5)
    assert layer.scale is before and layer.gain is after and layer.tag == "kept"
    assert "offsets" in layer._buffers and "offsets" not in layer.state_dict()
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "scale", "gain"]


def test_reset_of_an_attention_with_inferred_kdim_is_not_taken_for_a_reparametrization() -> None:
    # Its tensor names depend on the sizes (q_proj_weight ... once kdim differs):
    # names its constructor makes all the same, neither refused nor kept as a user's.
    mha = dnn.MultiheadAttention(num_heads=2)
    q, k = torch.randn(3, 2, 4), torch.randn(5, 2, 6)
    mha(q, k, k)
    di.reset(mha)
    assert di.pending(mha) == [""]
    mha(q, k, k)
    assert mha.kdim == 6 and mha.k_proj_weight.shape == (4, 6)
    di.reset(mha)
    mha(q, q, q)
    assert mha.kdim == 4 and mha.in_proj_weight.shape == (12, 4)
