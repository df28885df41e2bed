"""Modules declared on meta without ``di.deferred_init`` are materialized with a warning.

Nothing recorded their construction, so ``di.materialize`` can only run each layer's
own ``reset_parameters``: a model's init loop in its ``__init__`` (torchvision's
``kaiming_normal_(mode="fan_out")``) is lost. That is said once per call, naming the
modules and ``di.deferred_init`` as the fix (docs/design.md §2, issue 10 item 9). Layers
deferinit built, recorded constructions and modules with a registered initializer
(the user's own init) are filled as eager would, and are not warned about.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._errors import UnrecordedInitWarning


class TinyResNet(nn.Module):
    """Written the torchvision way: explicit sizes, then an init loop over its modules."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layers = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                for _ in range(blocks)
            )
        )
        self.fc = nn.Linear(8, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.layers(x))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


def eager(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


def materialize_recording(model: nn.Module, **kwargs: object) -> list[warnings.WarningMessage]:
    """``di.materialize(model)`` under seed 0, returning the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        di.materialize(model, **kwargs)  # type: ignore[arg-type]
    return [w for w in caught if issubclass(w.category, UnrecordedInitWarning)]


def test_a_torchvision_style_model_declared_on_meta_warns_naming_its_modules() -> None:
    with torch.device("meta"):
        model = TinyResNet()
    with pytest.warns(UnrecordedInitWarning) as caught:
        torch.manual_seed(0)
        di.materialize(model)
    assert len(caught) == 1  # one warning per call, however many modules
    message = str(caught[0].message)
    assert message.startswith(
        "di.materialize: conv1 (Conv2d), bn1 (BatchNorm2d), layers.0.0 (Conv2d), "
        "layers.0.1 (BatchNorm2d), layers.1.0 (Conv2d) and 4 more: declared under "
        "torch.device('meta') without di.deferred_init"
    ), message
    assert "each gets only its own reset_parameters" in message
    assert "init loops in its __init__" in message and "not replayed" in message
    assert "Fix: construct the model with di.deferred_init(Model, *args)" in message
    assert caught[0].filename == __file__  # points at the caller's di.materialize line
    # Why it warns: the init loop never ran, so the convolutions are not eager's.
    reference = eager()
    assert not torch.equal(model.conv1.weight, reference.conv1.weight)
    name = "layers.0.0.weight"
    assert not torch.equal(model.get_parameter(name), reference.get_parameter(name))


def test_the_same_model_through_deferred_init_is_eager_bitwise_without_a_warning() -> None:
    model = di.deferred_init(TinyResNet)
    assert materialize_recording(model) == []
    reference = eager()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_model_of_twins_built_on_meta_gives_no_warning() -> None:
    model = di.build(
        nn.Sequential(dnn.Conv2d(8, 3), dnn.BatchNorm2d(), nn.ReLU(), dnn.Linear(4)),
        (2, 3, 6, 6),
        device="meta",
    )
    assert materialize_recording(model) == []
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_twin_with_sublayers_at_the_root_gives_no_warning_and_draws_as_eager() -> None:
    # The root twin is constructed again whole; its sub-layers (out_proj) are not
    # declared modules of their own, and filling them again would draw extra numbers.
    model = di.build(dnn.MultiheadAttention(num_heads=2), (3, 8), (3, 8), (3, 8), device="meta")
    assert materialize_recording(model) == []
    after = torch.rand(4)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(8, 2)
    assert torch.equal(torch.rand(4), after)  # the generator is where eager leaves it
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_deferred_block_built_on_meta_gives_no_warning() -> None:
    block = di.defer(TinyResNet, blocks=di.dim(1))
    model = di.build(block(), (2, 3, 4, 4), device="meta")
    assert materialize_recording(model) == []
    reference = eager()
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_only_the_declared_modules_are_named_beside_twins() -> None:
    model = di.build(nn.Sequential(dnn.Linear(4), nn.ReLU()), (2, 3), device="meta")
    with torch.device("meta"):
        model.append(nn.Linear(4, 2))
    (warning,) = materialize_recording(model)
    assert str(warning.message).startswith("di.materialize: 2 (Linear): declared"), str(
        warning.message
    )


def test_a_declared_root_is_named_root() -> None:
    with torch.device("meta"):
        layer = nn.Linear(3, 2)
    (warning,) = materialize_recording(layer)
    assert str(warning.message).startswith("di.materialize: <root> (Linear): declared")


def test_modules_with_a_registered_initializer_are_not_named() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    di.initialize(model[0], {"weight": nn.init.ones_, "bias": nn.init.zeros_})
    (warning,) = materialize_recording(model)
    assert str(warning.message).startswith("di.materialize: 1 (Linear): declared")
    with torch.device("meta"):
        again = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    di.initialize(again, {"*.weight": nn.init.ones_})
    assert materialize_recording(again) == []
    assert torch.equal(again.get_parameter("1.weight"), torch.ones(2, 4))


def test_with_the_warning_an_error_nothing_is_allocated() -> None:
    # pytest runs with filterwarnings=error, as `python -W error` would: the warning
    # comes before any memory is allocated, so the refusal leaves the model on meta.
    with torch.device("meta"):
        model = TinyResNet()
    before = [(id(p), p.device.type) for p in model.parameters()]
    with pytest.raises(UnrecordedInitWarning, match="conv1 \\(Conv2d\\)"):
        di.materialize(model)
    assert [(id(p), p.device.type) for p in model.parameters()] == before


def test_the_warning_is_public_and_a_user_warning() -> None:
    assert di.UnrecordedInitWarning is UnrecordedInitWarning
    assert issubclass(UnrecordedInitWarning, UserWarning)
    assert not issubclass(UnrecordedInitWarning, di.DeferredInitError)
