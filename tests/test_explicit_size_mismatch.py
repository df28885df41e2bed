"""A deferinit layer given some of its sizes explicitly and fed an input that does
not match one of them (docs/design.md §3.4): a ``ShapeMismatchError`` worded as a
layer given every size gets (``dnn.Linear(4, in_features=3)`` fed 5 features),
and the layer is left unbuilt with the same placeholders (§3.5), so a corrected
call then builds it as eager torch would.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def test_conv_given_its_channels_fed_other_channels_names_the_given_size() -> None:
    conv = dnn.Conv(16, 3, in_channels=3)  # spatial_dims still inferred
    weight = conv.weight
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"^Conv layer was constructed with in_channels=3 given explicitly, but received "
        r"a float32 tensor of shape \(2, 5, 9, 9\), which would need in_channels=5\. Fix: "
        r"give it inputs that match in_channels=3, or construct it without in_channels=3 "
        r"to infer it\.$",
    ):
        conv(torch.randn(2, 5, 9, 9))
    assert isinstance(conv, di.Deferred) and conv.weight is weight
    x = torch.randn(2, 3, 9, 9)
    torch.manual_seed(0)
    out = conv(x)
    torch.manual_seed(0)
    eager = nn.Conv2d(3, 16, 3)
    built: nn.Module = conv
    assert type(built) is nn.Conv2d and built.weight is weight
    assert torch.equal(weight, eager.weight) and torch.equal(out, eager(x))


def test_the_message_matches_a_layer_given_every_size() -> None:
    def message(layer: nn.Module) -> str:
        with pytest.raises(di.ShapeMismatchError) as caught:
            layer(torch.randn(2, 5))
        return str(caught.value)

    # A Bilinear given in1_features only, fed the same first input as the Linear.
    pair_layer = di.defer(nn.Bilinear, in1_features=di.dim(-1), in2_features=di.dim(-1, arg=1))

    def message_of_pair(layer: nn.Module) -> str:
        with pytest.raises(di.ShapeMismatchError) as caught:
            layer(torch.randn(2, 5), torch.randn(2, 2))
        return str(caught.value)

    whole = message(dnn.Linear(4, in_features=3))
    assert whole.startswith("Linear layer was constructed with in_features=3 given explicitly")
    pair = message_of_pair(pair_layer(4, in1_features=3))
    assert pair.replace("in1_features", "in_features").replace("Bilinear", "Linear") == (
        whole.replace("shape (2, 5)", "shape (2, 5), a float32 tensor of shape (2, 2)")
    )


def test_bilinear_given_in1_fed_another_in1_size_is_a_shape_mismatch() -> None:
    layer = dnn.Bilinear(6, in1_features=5)
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"Bilinear layer was constructed with in1_features=5 given explicitly, but "
        r"received a float32 tensor of shape \(2, 4\), a float32 tensor of shape \(2, 3\), "
        r"which would need in1_features=4\. Fix: .*construct it without in1_features=5",
    ):
        layer(torch.randn(2, 4), torch.randn(2, 3))
    assert isinstance(layer, di.Deferred)
    assert layer(torch.randn(2, 5), torch.randn(2, 3)).shape == (2, 6)
    assert layer.in2_features == 3


def test_a_nested_layer_is_named_by_its_path() -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Bilinear(6, in1_features=3))

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net[2](self.net[1](self.net[0](x)), y)  # type: ignore[no-any-return]

    model = Both()
    with pytest.raises(di.ShapeMismatchError, match=r"^Bilinear layer 'net\.2' was constructed"):
        model(torch.randn(2, 7), torch.randn(2, 3))
    assert di.pending(model) == ["net.2"]


class Halves(nn.Module):
    """A user's block whose forward would take a wider input silently (it slices)."""

    def __init__(self, width: int, extra: int, out: int) -> None:
        super().__init__()
        self.width = width
        self.proj = nn.Linear(width + extra, out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x[..., : self.width], y], -1))  # type: ignore[no-any-return]


LazyHalves = di.defer(Halves, width=di.dim(-1, arg=0), extra=di.dim(-1, arg=1))


def test_a_deferred_user_class_given_part_of_its_sizes_refuses_a_mismatch() -> None:
    block = LazyHalves(width=3, out=2)
    with pytest.raises(
        di.ShapeMismatchError,
        match=r"Halves layer was constructed with width=3 given explicitly, but received .*"
        r"which would need width=5",
    ):
        block(torch.randn(2, 5), torch.randn(2, 4))
    assert isinstance(block, di.Deferred)
    assert block(torch.randn(2, 3), torch.randn(2, 4)).shape == (2, 2)
    assert block.proj.in_features == 7


def test_di_build_reports_the_same_mismatch_and_builds_nothing() -> None:
    conv = dnn.Conv(8, 3, in_channels=2)
    with pytest.raises(di.ShapeMismatchError, match="in_channels=2 given explicitly"):
        di.build(conv, torch.randn(1, 4, 6, 6))
    assert di.pending(conv) == [""]


def test_attentions_kdim_given_equal_to_embed_dim_is_no_mismatch() -> None:
    # kdim's rule reads None when key's size equals query's: not a plain size to compare.
    mha = dnn.MultiheadAttention(num_heads=2, kdim=4, vdim=4)
    q = torch.randn(3, 2, 4)
    out, _ = mha(q, q, q)
    assert out.shape == (3, 2, 4) and mha.kdim == 4
