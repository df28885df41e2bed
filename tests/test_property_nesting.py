"""Random architectures: deferred layers at any depth, mixed with explicit ones,
equal eager PyTorch bitwise under the same seed.

A model is drawn as a tree: ``nn.Sequential``, a custom module around an
``nn.Sequential``, an ``nn.ModuleList`` or an ``nn.ModuleDict`` at the inner
nodes; at the leaves, layers over an ``(N, C, L)`` tensor, each written either
deferred (``dnn.Linear(4)``), as the torch layer (``nn.Linear(3, 4)``) or as a
twin given its size (``dnn.Linear(4, in_features=3)``).

Order of random draws: an explicit layer draws its initialization when the model
is constructed, a deferred one at the first forward (in execution order, which
here is registration order). The eager reference is therefore constructed under
the same seed in that order: explicit leaves first, then deferred ones. When
every leaf is deferred, that is plain eager construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from torch import nn

import deferinit as di
from deferinit import nn as dnn

# --- containers ---------------------------------------------------------------------


class Wrapped(nn.Module):
    """A user's module around an ``nn.Sequential``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.tanh(self.body(x))  # (N, C, L)
        return out


class Listed(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Keyed(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({f"m{i}": layer for i, layer in enumerate(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x


CONTAINERS: dict[str, Callable[..., nn.Module]] = {
    "Sequential": nn.Sequential,
    "Wrapped": Wrapped,
    "ModuleList": Listed,
    "ModuleDict": Keyed,
}


# --- the spec of a model ------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    kind: str
    mode: str  # "deferred" | "torch" | "twin" (a twin given its size explicitly)
    c: int  # input channels
    length: int  # input length
    options: dict[str, int] = field(default_factory=dict)

    def torch_layer(self) -> nn.Module:
        c, length, o = self.c, self.length, self.options
        if self.kind == "Linear":
            return nn.Linear(length, o["out"])
        if self.kind in ("Conv1d", "ConvTranspose1d"):
            cls = getattr(nn, self.kind)
            layer: nn.Module = cls(c, o["out"], o["k"], padding=o["k"] // 2)
            return layer
        if self.kind == "BatchNorm1d":
            return nn.BatchNorm1d(c)
        if self.kind == "InstanceNorm1d":
            return nn.InstanceNorm1d(c, affine=True)
        if self.kind == "GroupNorm":
            return nn.GroupNorm(o["groups"], c)
        if self.kind in ("LayerNorm", "RMSNorm"):
            shape = (length,) if o["ndim"] == 1 else (c, length)
            norm: nn.Module = getattr(nn, self.kind)(shape)
            return norm
        if self.kind == "PReLU":
            return nn.PReLU(c if o["per_channel"] else 1)
        assert self.kind == "ReLU"
        return nn.ReLU()

    def twin(self, explicit: bool) -> nn.Module:
        c, length, o = self.c, self.length, self.options
        made: nn.Module
        if self.kind == "Linear":
            size = {"in_features": length} if explicit else {}
            made = dnn.Linear(o["out"], **size)
        elif self.kind in ("Conv1d", "ConvTranspose1d"):
            size = {"in_channels": c} if explicit else {}
            made = getattr(dnn, self.kind)(o["out"], o["k"], padding=o["k"] // 2, **size)
        elif self.kind in ("BatchNorm1d", "InstanceNorm1d"):
            size = {"num_features": c} if explicit else {}
            affine = {"affine": True} if self.kind == "InstanceNorm1d" else {}
            made = getattr(dnn, self.kind)(**affine, **size)
        elif self.kind == "GroupNorm":
            size = {"num_channels": c} if explicit else {}
            made = dnn.GroupNorm(o["groups"], **size)
        elif self.kind in ("LayerNorm", "RMSNorm"):
            shape = (length,) if o["ndim"] == 1 else (c, length)
            sized = {"normalized_shape": shape} if explicit else {}
            made = getattr(dnn, self.kind)(ndim=o["ndim"], **sized)
        elif self.kind == "PReLU":
            if explicit:
                made = dnn.PReLU(num_parameters=c if o["per_channel"] else 1)
            else:
                made = dnn.PReLU(per_channel=bool(o["per_channel"]))
        else:
            made = nn.ReLU()
        return made

    @property
    def draws_late(self) -> bool:
        """Whether the deferred model constructs this leaf at the first forward."""
        if self.mode != "deferred" or self.kind == "ReLU":
            return False
        return not (self.kind == "PReLU" and not self.options["per_channel"])


@dataclass(frozen=True)
class Node:
    kind: str  # a key of CONTAINERS
    children: tuple[Spec, ...]


Spec = Leaf | Node

KINDS = [
    "Linear",
    "Conv1d",
    "ConvTranspose1d",
    "BatchNorm1d",
    "InstanceNorm1d",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
    "PReLU",
    "ReLU",
]


@st.composite
def leaves(draw: st.DrawFn, c: int, length: int) -> tuple[Leaf, int, int]:
    """A leaf for an (N, c, length) input, and the (channels, length) it outputs."""
    kind = draw(st.sampled_from(KINDS))
    mode = draw(st.sampled_from(["deferred", "deferred", "torch", "twin"]))
    options: dict[str, int] = {}
    out_c, out_length = c, length
    if kind == "Linear":
        options["out"] = out_length = draw(st.integers(2, 5))  # instance norm needs L >= 2
    elif kind in ("Conv1d", "ConvTranspose1d"):
        options["out"] = out_c = draw(st.integers(1, 5))
        options["k"] = draw(st.sampled_from([1, 3]))  # odd, so padding k // 2 keeps L
    elif kind == "GroupNorm":
        options["groups"] = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    elif kind in ("LayerNorm", "RMSNorm"):
        options["ndim"] = draw(st.sampled_from([1, 2]))
    elif kind == "PReLU":
        options["per_channel"] = int(draw(st.booleans()))
    return Leaf(kind, mode, c, length, options), out_c, out_length


@st.composite
def blocks(draw: st.DrawFn, c: int, length: int, depth: int) -> tuple[Spec, int, int]:
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        leaf: tuple[Spec, int, int] = draw(leaves(c, length))
        return leaf
    kind = draw(st.sampled_from(sorted(CONTAINERS)))
    children: list[Spec] = []
    for _ in range(draw(st.integers(1, 3))):
        child, c, length = draw(blocks(c, length, depth - 1))
        children.append(child)
    return Node(kind, tuple(children)), c, length


@st.composite
def models(draw: st.DrawFn) -> tuple[Node, int, int]:
    c, length = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    kind = draw(st.sampled_from(sorted(CONTAINERS)))
    children: list[Spec] = []
    out_c, out_length = c, length
    for _ in range(draw(st.integers(1, 4))):
        child, out_c, out_length = draw(blocks(out_c, out_length, 2))
        children.append(child)
    return Node(kind, tuple(children)), c, length


# --- building both models ------------------------------------------------------------


def flat(spec: Spec) -> list[Leaf]:
    if isinstance(spec, Leaf):
        return [spec]
    return [leaf for child in spec.children for leaf in flat(child)]


def assemble(spec: Spec, made: Iterator[nn.Module]) -> nn.Module:
    if isinstance(spec, Leaf):
        return next(made)
    return CONTAINERS[spec.kind](*(assemble(child, made) for child in spec.children))


def deferred_model(spec: Node) -> tuple[nn.Module, list[nn.Module]]:
    """The model as a deferinit user writes it, and its leaves that wait for data."""
    made: list[nn.Module] = []
    for leaf in flat(spec):
        if leaf.mode == "torch":
            made.append(leaf.torch_layer())
        else:
            made.append(leaf.twin(explicit=leaf.mode == "twin"))
    late = [m for leaf, m in zip(flat(spec), made, strict=True) if leaf.draws_late]
    return assemble(spec, iter(made)), late


def eager_model(spec: Node) -> nn.Module:
    """Eager torch layers, constructed in the order the deferred model draws."""
    leaves_ = flat(spec)
    made: dict[int, nn.Module] = {}
    order = [i for i, leaf in enumerate(leaves_) if not leaf.draws_late]
    order += [i for i, leaf in enumerate(leaves_) if leaf.draws_late]
    for i in order:
        made[i] = leaves_[i].torch_layer()
    return assemble(spec, iter(made[i] for i in range(len(leaves_))))


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for key, value in want_state.items():
        assert got_state[key].dtype == value.dtype, key
        assert torch.equal(got_state[key], value), key


# --- the property -------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(models(), st.integers(0, 2**16))
def test_random_nesting_of_deferred_and_explicit_layers_equals_eager(
    drawn: tuple[Node, int, int], seed: int
) -> None:
    spec, c, length = drawn
    x, x2 = torch.randn(2, c, length), torch.randn(3, c, length)  # before the seed

    torch.manual_seed(seed)
    model, late = deferred_model(spec)
    expected_pending = [name for name, m in model.named_modules() if any(m is w for w in late)]
    assert di.pending(model) == expected_pending
    assert di.is_built(model) == (not late)
    out = model(x)

    torch.manual_seed(seed)
    eager = eager_model(spec)
    want = eager(x)

    assert di.is_built(model) and di.pending(model) == []
    assert [type(m) for m in model.modules()] == [type(m) for m in eager.modules()]
    assert repr(model) == repr(eager)
    assert_same_state(model, eager)
    assert torch.equal(out, want)
    assert torch.equal(model(x2), eager(x2))  # batch size is free after build
    assert_same_state(model, eager)  # running statistics moved alike


def test_all_deferred_model_equals_plain_eager_construction() -> None:
    x = torch.randn(2, 3, 5)
    torch.manual_seed(0)
    model = nn.Sequential(
        dnn.Conv1d(4, 3, padding=1),
        Wrapped(dnn.BatchNorm1d(), dnn.PReLU(per_channel=True)),
        Listed(dnn.GroupNorm(2), dnn.Linear(6)),
        Keyed(dnn.LayerNorm(ndim=2), dnn.ConvTranspose1d(2, 1), dnn.RMSNorm()),
    )
    out = model(x)
    torch.manual_seed(0)
    eager = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1),
        Wrapped(nn.BatchNorm1d(4), nn.PReLU(4)),
        Listed(nn.GroupNorm(2, 4), nn.Linear(5, 6)),
        Keyed(nn.LayerNorm((4, 6)), nn.ConvTranspose1d(4, 2, 1), nn.RMSNorm(6)),
    )
    want = eager(x)
    assert repr(model) == repr(eager)
    assert_same_state(model, eager)
    assert torch.equal(out, want)
