"""``di.load_state_dict(strict=False)`` reports the unexpected keys torch reports, in
torch's order, for keys in any order and at any depth (a child set to ``None``, a
non-persistent buffer, extra state, a key naming a module)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

import deferinit as di


class _Extra(nn.Linear):
    def get_extra_state(self) -> Any:
        return {"note": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2), _Extra(2, 2))
        self.gone: nn.Module | None = None
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _model() -> nn.Module:
    return nn.Sequential(_Block(), nn.Linear(2, 2), _Block())


def test_unexpected_keys_equal_torchs_in_torchs_order() -> None:
    rng = random.Random(0)
    state = dict(_model().state_dict())
    extra = [
        "junk",
        "0.junk",
        "0.inner.junk",
        "0.inner.1.junk",
        "0.gone.weight",
        "0.scratch",
        "1.weight.x",
        "2.inner",
        "2.inner.0.bias.y",
        "3.weight",
    ]
    for key in extra:
        state[key] = torch.zeros(1)
    for _ in range(5):
        keys = list(state)
        rng.shuffle(keys)
        shuffled = {k: state[k] for k in keys}
        theirs = _model().load_state_dict(dict(shuffled), strict=False)
        ours = di.load_state_dict(_model(), dict(shuffled), strict=False)
        assert ours.unexpected_keys == theirs.unexpected_keys
        assert ours.missing_keys == theirs.missing_keys
