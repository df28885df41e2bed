"""``self.apply(fn)`` inside a constructor recorded with ``di.deferred_init`` reaches
the deferred layers at its place in program order: the replay runs ``fn`` over each
twin's fresh module there, between the draws around it, so the values are eager's
(DESIGN §2: bitwise what the factory gives, init loops included)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class Net(nn.Module):
    """A timm / Hugging Face style model: layers, then one init pass over them."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8) if explicit else dnn.Linear(8)
        self.mid = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2) if explicit else dnn.Linear(2)
        self.pos = nn.Parameter(torch.empty(1, 8))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.apply(_normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.mid(self.a(x)) + self.pos)
        return out


def _same(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_init_pass_in_a_recorded_constructor_gives_eagers_values() -> None:
    model = di.deferred_init(Net)
    di.build(model, (2, 4), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    after = torch.get_rng_state()
    torch.manual_seed(0)
    eager = Net(explicit=True)
    assert _same(model, eager)
    assert torch.equal(after, torch.get_rng_state())  # the generator ends where eager's does


@pytest.mark.parametrize("threads", [1, 2])
def test_with_seed_the_applied_function_runs_too(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = di.deferred_init(Net)
        di.build(model, (2, 4), device="meta")
        di.materialize(model, seed=3)
    finally:
        torch.set_num_threads(before)
    for layer in (model.a, model.mid, model.b):
        assert isinstance(layer, nn.Linear)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))  # _normal_init ran
        assert layer.weight.std().item() < 0.05


def _ones_bias(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.ones_(m.bias)


def test_apply_to_twins_after_recording_runs_after_the_whole_construction() -> None:
    model = di.deferred_init(Net)
    model.a.apply(_ones_bias)  # after the factory's own self.apply(_normal_init)
    model.b.apply(_ones_bias)
    di.build(model, (2, 4), device="meta")
    di.materialize(model)
    for layer in (model.a, model.b):
        assert isinstance(layer, nn.Linear)
        assert torch.equal(layer.bias, torch.ones_like(layer.bias))
