"""A declaration like one seen before (same class, plain positional arguments,
default dtype) reuses its bound arguments and layout: each layer must still be
independent of the other, and of declarations that only look alike."""

from __future__ import annotations

import gc
import pickle
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn

DeclaredIn = Callable[[torch.dtype, Callable[[], nn.Module]], nn.Module]


def test_layers_declared_alike_build_their_own_sizes() -> None:
    a, b = dnn.Linear(4), dnn.Linear(4)
    a(torch.randn(2, 3))
    b(torch.randn(2, 5))
    assert (a.in_features, b.in_features) == (3, 5)
    assert a.weight.shape == (4, 3) and b.weight.shape == (4, 5)
    c = dnn.Linear(4)
    assert c._di.arguments == {"out_features": 4}
    assert c._di.arguments is not a._di.arguments


def test_a_change_to_one_layers_arguments_does_not_reach_the_next() -> None:
    dnn.Linear(4)  # remembered: the next two are declarations seen before
    first = dnn.Linear(4)
    first._di.arguments["bias"] = False
    second = dnn.Linear(4)
    second(torch.randn(1, 2))
    assert second.bias is not None


def test_arguments_equal_but_of_another_type_are_kept_as_given() -> None:
    dnn.Conv2d(8, 3, 1)
    layer = dnn.Conv2d(8, 3, True)  # stride=True == 1, but a bool
    assert layer._di.arguments["stride"] is True


def test_another_default_dtype_is_declared_afresh(declared_in: DeclaredIn) -> None:
    dnn.Linear(3)
    layer = declared_in(torch.float64, lambda: dnn.Linear(3))
    assert layer.weight.dtype == torch.float64
    assert dnn.Linear(3).weight.dtype == torch.get_default_dtype()


def test_a_layer_declared_again_equals_eager() -> None:
    x = torch.randn(2, 6)
    for _ in range(3):
        torch.manual_seed(0)
        model = nn.Sequential(dnn.Linear(5), nn.ReLU(), dnn.Linear(2))
        out = model(x)
        torch.manual_seed(0)
        eager = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        assert torch.equal(out, eager(x))


def test_a_layer_declared_again_holds_fresh_module_state_of_its_own() -> None:
    dnn.Linear(7)
    a, b = dnn.Linear(7), dnn.Linear(7)
    fresh = nn.Module().__dict__
    lazy = {"_parameters", "_buffers"}  # made when first looked at
    assert set(a.__dict__) - {"_di"} == set(fresh) - lazy
    for key, value in fresh.items():
        if isinstance(value, dict | set) and key not in lazy:
            assert type(a.__dict__[key]) is type(value)
            assert a.__dict__[key] is not b.__dict__[key]
    a.register_forward_hook(lambda *_: None)
    assert not b._forward_hooks
    assert dict(a.named_parameters()).keys() == {"weight", "bias"}


def test_a_built_layer_keeps_no_reference_to_the_input_it_was_built_from() -> None:
    layer = dnn.Linear(2)
    x = torch.randn(4, 3)
    seen = weakref.ref(x)
    layer(x)
    del x
    gc.collect()
    assert seen() is None
    assert str(layer._di.built_from) == "a float32 tensor of shape (4, 3)"


def test_where_a_layer_was_built_from_survives_pickle_as_text() -> None:
    layer = dnn.Linear(2)
    layer(torch.randn(4, 3))
    again = pickle.loads(pickle.dumps(layer))
    assert again._di.built_from == "a float32 tensor of shape (4, 3)"
    with pytest.raises(di.ShapeMismatchError, match=r"float32 tensor of shape \(4, 3\)"):
        again(torch.randn(4, 5))


def test_options_and_keywords_declared_again_are_kept() -> None:
    for _ in range(2):
        norm = dnn.LayerNorm(ndim=2)
        norm(torch.randn(3, 4, 5))
        assert norm.normalized_shape == (4, 5)
        conv = dnn.Conv2d(8, 3, padding=1, bias=False)
        conv(torch.randn(1, 2, 6, 6))
        assert (conv.in_channels, conv.padding, conv.bias) == (2, (1, 1), None)
    plain = dnn.LayerNorm()
    plain(torch.randn(3, 4, 5))
    assert plain.normalized_shape == (5,)


def test_a_size_given_by_keyword_declared_again_is_kept() -> None:
    for _ in range(2):
        prelu = dnn.PReLU(per_channel=True)
        prelu(torch.randn(2, 3, 4))
        assert prelu.num_parameters == 3
        fixed = dnn.Conv2d(4, 1, in_channels=2)
        assert type(fixed) is nn.Conv2d  # type: ignore[comparison-overlap]  # built at once
        assert fixed.in_channels == 2


def test_a_known_layers_layout_is_worked_out_when_first_read() -> None:
    layer = dnn.Linear(13)
    assert layer._di.__dict__["_layout"] is None and layer._di.late
    again = pickle.loads(pickle.dumps(layer))
    layout = layer._di.layout
    assert layout is not None and [t.name for t in layout.tensors] == ["weight", "bias"]
    assert not layer._di.late and layer._di.layout is layout
    assert again._di.layout is not None and again._di.layout.tensors == layout.tensors
    assert repr(dnn.Linear(13)) == "Linear(in_features=?, out_features=13, bias=True)"


def test_a_state_pickled_with_its_layout_under_the_old_name_still_reads_it() -> None:
    layer = dnn.Linear(14)
    state = layer._di
    layout = state.layout
    d = state.__dict__
    d["layout"] = d.pop("_layout")  # as a State pickled before the field was renamed
    assert state.layout is layout
