"""Sizes from a checkpoint where a saved dimension is a *fraction* of the size:
grouped and depthwise convolutions (``weight.shape[1] == in_channels // groups``).

The relation between a constructor argument and a saved dimension is learnt from
two meta constructions; for a grouped convolution its slope is ``1 / groups``, so
it is solved in rational arithmetic. A saved shape that no whole size gives is a
``DeferredInitError`` naming the layer, the key and the shape, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


@dataclass(frozen=True)
class Case:
    id: str
    eager: Callable[[], nn.Module]  # with every size written out
    deferred: Callable[[], nn.Module]  # in_channels inferred
    shape: tuple[int, ...]  # an input of the eager layer
    in_channels: int


def _cases() -> list[Case]:
    cases: list[Case] = []
    for rank in (1, 2, 3):
        conv, twin = getattr(nn, f"Conv{rank}d"), getattr(dnn, f"Conv{rank}d")
        up, up_twin = getattr(nn, f"ConvTranspose{rank}d"), getattr(dnn, f"ConvTranspose{rank}d")
        spatial = (5,) * rank
        # (id, in, out, groups): grouped, depthwise, depthwise with a multiplier.
        for kind, cin, cout, groups in (
            ("grouped", 6, 4, 2),
            ("depthwise", 4, 4, 4),
            ("depthwise-x3", 4, 12, 4),
        ):
            shape = (2, cin, *spatial)
            for name, eager_cls, twin_cls, generic in (
                (f"Conv{rank}d", conv, twin, dnn.Conv),
                (f"ConvTranspose{rank}d", up, up_twin, dnn.ConvTranspose),
            ):

                def eager(
                    c: type[nn.Module] = eager_cls, i: int = cin, o: int = cout, g: int = groups
                ) -> nn.Module:
                    return c(i, o, 3, groups=g)

                def deferred(
                    t: Callable[..., nn.Module] = twin_cls, o: int = cout, g: int = groups
                ) -> nn.Module:
                    return t(o, 3, groups=g)

                def rank_generic(
                    t: Callable[..., nn.Module] = generic, o: int = cout, g: int = groups
                ) -> nn.Module:
                    return t(o, 3, groups=g)

                cases.append(Case(f"{name}-{kind}", eager, deferred, shape, cin))
                cases.append(Case(f"{name}-{kind}-rank-generic", eager, rank_generic, shape, cin))
    return cases


CASES = _cases()
IDS = [c.id for c in CASES]


def _trained(case: Case) -> nn.Module:
    """The eager layer with values no initializer gives."""
    torch.manual_seed(1234)
    eager = case.eager()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p))
    return eager


@pytest.mark.parametrize("route", ["di", "torch"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_grouped_convolution_takes_its_sizes_from_a_checkpoint(case: Case, route: str) -> None:
    eager = _trained(case)
    net = nn.Sequential(case.deferred())
    saved = nn.Sequential(eager).state_dict()
    if route == "di":
        di.load_state_dict(net, saved)
    else:
        net.load_state_dict(saved)
    layer = net[0]
    assert type(layer) is type(eager)
    assert repr(layer) == repr(eager)
    assert layer.in_channels == case.in_channels
    for key, value in eager.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    x = torch.randn(case.shape)
    assert torch.equal(layer(x), eager(x))


def test_the_reported_grouped_conv_loads() -> None:
    net = nn.Sequential(dnn.Conv(4, 3, groups=2))
    saved = nn.Sequential(nn.Conv2d(6, 4, 3, groups=2)).state_dict()
    di.load_state_dict(net, saved)
    assert repr(net[0]) == repr(nn.Conv2d(6, 4, 3, groups=2))
    twin = nn.Sequential(dnn.Conv2d(4, 3, groups=2))
    twin.load_state_dict(saved)
    assert repr(twin[0]) == repr(nn.Conv2d(6, 4, 3, groups=2))


class Doubled(nn.Module):
    """A layer whose saved width is twice its size: odd widths fit no size."""

    def __init__(self, n: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * n, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(torch.cat([x, x], dim=-1))
        return out


LazyDoubled = di.defer(Doubled, n=di.dim(-1))


def test_a_doubled_size_loads_from_an_even_saved_width() -> None:
    saved = nn.Sequential(Doubled(3, 2)).state_dict()
    net = nn.Sequential(LazyDoubled(out=2))
    di.load_state_dict(net, saved)
    assert type(net[0]) is Doubled
    assert net[0].proj.in_features == 6


@pytest.mark.parametrize("route", ["di", "torch"])
def test_a_saved_shape_that_no_whole_size_gives_is_a_clear_error(route: str) -> None:
    saved = {"0.proj.weight": torch.ones(2, 5), "0.proj.bias": torch.ones(2)}
    net = nn.Sequential(LazyDoubled(out=2))
    expected = r"'0'.*\bn\b.*proj\.weight.*\(2, 5\)"
    if route == "di":
        with pytest.raises(di.DeferredInitError, match=expected):
            di.load_state_dict(net, saved)
    else:
        with pytest.raises(RuntimeError, match=expected):
            net.load_state_dict(saved)
    assert di.pending(net) == ["0"]


@pytest.mark.parametrize("route", ["di", "torch"])
def test_a_grouped_conv_checkpoint_of_other_out_channels_is_refused_and_stays_deferred(
    route: str,
) -> None:
    # weight (5, 3, 3, 3) gives in_channels = 6 for groups=2, but the layer was
    # declared with out_channels=4: named, and the layer is left deferred.
    saved = {"0.weight": torch.ones(5, 3, 3, 3), "0.bias": torch.ones(5)}
    net = nn.Sequential(dnn.Conv2d(4, 3, groups=2))
    placeholders = list(net.parameters())
    if route == "di":
        with pytest.raises(di.DeferredInitError, match=r"0\.weight.*\(5, 3, 3, 3\)"):
            di.load_state_dict(net, saved)
    else:
        with pytest.raises(
            RuntimeError, match=r"size mismatch for 0\.weight: .*\[5, 3, 3, 3\].*left unbuilt"
        ):
            net.load_state_dict(saved)
    assert di.pending(net) == ["0"]
    assert all(p is q for p, q in zip(net.parameters(), placeholders, strict=True))
