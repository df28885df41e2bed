"""Tensors a recorded construction leaves inside plain Python objects (a helper
class's instance, a dataclass, containers within containers) are replayed as
eager's, under the same objects; one set on the module's class, which the replay
cannot fill, is refused at the recording (never a fake tensor left to reach the
user's code)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

import deferinit as di
from deferinit._record import RecordError


class Rotary:
    """A plain helper object, not a module (rotary embeddings are often written so)."""

    def __init__(self, dim: int) -> None:
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))


@dataclasses.dataclass(frozen=True)
class Scales:
    scale: torch.Tensor
    shifts: tuple[torch.Tensor, ...]


class Held(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.rotary = Rotary(8)
        self.scales = Scales(torch.full((2,), 3.0), (torch.randn(2), torch.zeros(1)))
        self.nested = {"a": [torch.randn(3), {"b": torch.ones(2)}]}
        self.alias = [self.rotary.inv_freq]  # the same tensor at two places

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x) * self.rotary.inv_freq.repeat(2)
        return out


def _held(m: Held) -> list[torch.Tensor]:
    return [
        m.rotary.inv_freq,
        m.scales.scale,
        *m.scales.shifts,
        m.nested["a"][0],  # type: ignore[list-item]
        m.nested["a"][1]["b"],  # type: ignore[index]
        *m.alias,
    ]


def test_tensors_inside_plain_objects_are_replayed_as_eager() -> None:
    torch.manual_seed(0)
    eager = Held()
    torch.manual_seed(5)
    model = di.deferred_init(Held)
    holder = model.rotary
    assert all(t.is_meta for t in _held(model))
    torch.manual_seed(0)
    di.materialize(model)
    assert model.rotary is holder  # the objects stay; their tensors are filled
    for ours, theirs in zip(_held(model), _held(eager), strict=True):
        assert type(ours) is torch.Tensor and torch.equal(ours, theirs)
    assert model.alias[0] is model.rotary.inv_freq
    x = torch.randn(2, 8)
    assert torch.equal(model(x), eager(x))


def test_a_tensor_set_on_the_class_is_refused_at_the_recording() -> None:
    class OnClass(nn.Module):
        table: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            type(self).table = torch.arange(3.0)

    with pytest.raises(RecordError, match=r"its class OnClass\.table.*Fix"):
        di.deferred_init(OnClass)


class Slotted:
    __slots__ = ("table",)

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table


class Unusual(nn.Module):
    """Tensors behind __slots__, in a module held in a plain list (not registered),
    twelve lists deep, and a reference back to a registered layer."""

    def __init__(self) -> None:
        super().__init__()
        self.slotted = Slotted(torch.randn(4))
        self.helpers = [nn.Linear(2, 2)]
        deep: object = torch.randn(3)
        for _ in range(12):
            deep = [deep]
        self.deep = deep
        self.head = nn.Linear(3, 3)
        self.shortcut = {"head": self.head}


def _unusual(m: Unusual) -> list[torch.Tensor]:
    deep: object = m.deep
    for _ in range(12):
        deep = deep[0]  # type: ignore[index]
    return [m.slotted.table, m.helpers[0].weight, m.helpers[0].bias, deep]  # type: ignore[list-item]


def test_slots_unregistered_modules_and_deep_nesting_are_replayed_and_dtype_converts() -> None:
    torch.manual_seed(0)
    eager = Unusual()
    model = di.deferred_init(Unusual)
    torch.manual_seed(0)
    di.materialize(model, dtype=torch.float64)
    for ours, theirs in zip(_unusual(model), _unusual(eager), strict=True):
        assert not isinstance(ours, FakeTensor)
        assert torch.equal(ours, theirs)  # plain attributes keep their dtype
    assert model.head.weight.dtype == torch.float64  # a parameter, found through a dict too
    assert model.shortcut["head"] is model.head


class TooDeep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        deep: object = torch.randn(3)
        for _ in range(40):
            deep = [deep]
        self.deep = deep


def test_a_tensor_deeper_than_the_replay_looks_is_refused_at_the_recording() -> None:
    with pytest.raises(RecordError, match=r"still holds a fake tensor.*Fix"):
        di.deferred_init(TooDeep)
