"""``di.build`` refuses the inputs the first forward refuses (DESIGN §3.5): an
example whose dtype a deferinit.nn layer's eager forward rejects (integers or
bools into a float layer, float64 into a float32 Linear) is an
``InferenceError`` naming the layer, with nothing built. What eager accepts still
builds: the layer's converted dtype (``.double()`` before the build), autocast,
a pre-hook that converts, and ``di.defer`` classes, which may take integers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def _mlp() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(3))


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float64, torch.float16])
def test_an_example_the_first_forward_refuses_is_refused(dtype: torch.dtype) -> None:
    x = torch.ones(2, 5, dtype=dtype)
    with pytest.raises(di.InferenceError) as eager:
        _mlp()(x)
    model = _mlp()
    with pytest.raises(di.InferenceError) as caught:
        di.build(model, x)
    message = str(caught.value)
    assert message.startswith("Linear layer '0': built with in_features=5 from ")
    assert str(eager.value).startswith("Linear layer '0': built with in_features=5 from ")
    assert "float32" in message and "Nothing was built" in message
    assert di.pending(model) == ["0", "2"]


def test_a_meta_example_of_the_wrong_dtype_is_refused() -> None:
    model = _mlp()
    with pytest.raises(di.InferenceError, match="'0'"):
        di.build(model, torch.empty(2, 5, dtype=torch.long, device="meta"))
    assert di.pending(model) == ["0", "2"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(dnn.Conv2d(4, 3)),
        lambda: nn.Sequential(dnn.Conv(4, 3)),
        lambda: nn.Sequential(dnn.BatchNorm2d()),
        lambda: nn.Sequential(dnn.LayerNorm(ndim=3)),
        lambda: nn.Sequential(dnn.PReLU(per_channel=True)),
        lambda: nn.Sequential(dnn.GRU(5, batch_first=True), nn.Identity()),
    ],
)
def test_integer_examples_are_refused_by_every_float_layer(make: object) -> None:
    x = torch.ones(2, 3, 6, 6, dtype=torch.long)
    if "GRU" in repr(make()):  # type: ignore[operator]
        x = torch.ones(2, 6, 3, dtype=torch.long)
    model = make()  # type: ignore[operator]
    with pytest.raises(di.InferenceError, match="layer '0'"):
        di.build(model, x)
    assert di.pending(model) == ["0"]


def test_a_norm_takes_a_lower_precision_input_as_eager_does() -> None:
    x = torch.ones(2, 5, dtype=torch.bfloat16)
    nn.LayerNorm(5)(x)  # eager accepts it
    model = di.build(nn.Sequential(dnn.LayerNorm()), x)
    assert model[0].normalized_shape == (5,)


def test_the_converted_dtype_is_the_layer_dtype() -> None:
    model = _mlp().double()
    di.build(model, torch.ones(2, 5, dtype=torch.float64))
    assert model(torch.ones(2, 5, dtype=torch.float64)).dtype == torch.float64
    shaped = di.build(_mlp().double(), (2, 5))
    assert shaped(torch.ones(2, 5, dtype=torch.float64)).shape == (2, 3)
    model = _mlp().double()
    with pytest.raises(di.InferenceError, match="float64"):
        di.build(model, torch.ones(2, 5))
    assert di.pending(model) == ["0", "2"]


def test_under_autocast_another_floating_dtype_builds() -> None:
    model = _mlp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        di.build(model, torch.ones(2, 5, dtype=torch.float64))
        with pytest.raises(di.InferenceError, match="'0'"):
            di.build(_mlp(), torch.ones(2, 5, dtype=torch.long))
    assert di.pending(model) == []


def test_a_pre_hook_that_converts_is_seen() -> None:
    model = _mlp()
    model[0].register_forward_pre_hook(lambda _m, args: (args[0].float(),))
    di.build(model, torch.ones(2, 5, dtype=torch.long))
    assert di.pending(model) == []


class _Lookup(nn.Linear):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids.float())


def test_defer_classes_are_not_checked() -> None:
    lookup = di.defer(_Lookup, in_features=di.dim(-1))
    model = di.build(nn.Sequential(lookup(out_features=3)), torch.ones(2, 5, dtype=torch.long))
    assert model[0].in_features == 5


_FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_NORM_LIKE = {
    "BatchNorm1d": (dnn.BatchNorm1d, (2, 4)),
    "LayerNorm": (dnn.LayerNorm, (2, 4)),
    "GroupNorm": (lambda: dnn.GroupNorm(2), (2, 4, 3)),
    "InstanceNorm1d": (dnn.InstanceNorm1d, (2, 4, 3)),
    "InstanceNorm1d-affine": (lambda: dnn.InstanceNorm1d(affine=True), (2, 4, 3)),
    "RMSNorm": (dnn.RMSNorm, (2, 4)),
    "Linear": (lambda: dnn.Linear(3), (2, 4)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # InstanceNorm's own, on odd inputs
@pytest.mark.parametrize("name", list(_NORM_LIKE))
def test_di_build_takes_exactly_the_example_dtypes_the_first_forward_takes(name: str) -> None:
    make, shape = _NORM_LIKE[name]
    for layer_dtype in _FLOATS:
        for input_dtype in _FLOATS:
            x = torch.randn(shape).to(input_dtype)
            try:
                di.build(nn.Sequential(make()).to(layer_dtype), x)  # type: ignore[operator]
                built = True
            except di.InferenceError:
                built = False
            try:
                nn.Sequential(make()).to(layer_dtype)(x)  # type: ignore[operator]
                ran = True
            except (RuntimeError, ValueError):
                ran = False
            assert built == ran, (name, layer_dtype, input_dtype, built, ran)


class _Casts(nn.Module):
    """Its forward hands an integer tensor to a floating layer, which eager refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = dnn.Linear(4)
        self.b = dnn.Linear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x).long())
        return out


@pytest.mark.parametrize("device", [None, "meta"])
def test_an_integer_input_made_inside_the_model_is_refused_also_for_shape_examples(
    device: str | None,
) -> None:
    model = _Casts()
    with pytest.raises(di.InferenceError, match=r"layer 'b'.*int64.*Fix"):
        di.build(model, (2, 5), device=device)
    assert di.pending(model) == ["a", "b"]  # all or nothing, as the first forward refuses
    with pytest.raises(di.InferenceError, match="layer 'b'"):
        model(torch.randn(2, 5))
