"""``inspect.signature`` of a deferred class is exactly the real class's minus the
inferred arguments (DESIGN §2): the same parameters with their kinds, defaults and
annotations, and the same return annotation. A rule's options (LayerNorm's ``ndim``,
PReLU's ``per_channel``) are not torch's arguments: they are taken by keyword and
named in the twin's docstring, not shown in the signature.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit.nn import RANK_GENERIC

TWIN_NAMES = [
    name
    for name in dnn.__all__
    if isinstance(getattr(dnn, name), type) and issubclass(getattr(dnn, name), di.Deferred)
]

# torch's RNN, LSTM and GRU declare only (*args, **kwargs); these are their documented
# arguments, in torch's order, with torch's defaults.
_RNN_COMMON = [("input_size", inspect.Parameter.empty), ("hidden_size", inspect.Parameter.empty)]
_RNN_TAIL = [("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)]
DOCUMENTED: dict[type[nn.Module], list[tuple[str, object]]] = {
    nn.RNN: [*_RNN_COMMON, ("num_layers", 1), ("nonlinearity", "tanh"), *_RNN_TAIL],
    nn.LSTM: [*_RNN_COMMON, ("num_layers", 1), *_RNN_TAIL, ("proj_size", 0)],
    nn.GRU: [*_RNN_COMMON, ("num_layers", 1), *_RNN_TAIL],
}


def kind(module: nn.Module) -> type[nn.Module]:
    """``type(module)``, which a build changes under mypy's feet."""
    return type(module)


def _minus(signature: inspect.Signature, inferred: object) -> inspect.Signature:
    kept = [p for name, p in signature.parameters.items() if name not in inferred]  # type: ignore[operator]
    return signature.replace(parameters=kept)


def _documented(cls: type[nn.Module]) -> inspect.Signature:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = [*DOCUMENTED[cls], ("device", None), ("dtype", None)]
    return inspect.Signature([inspect.Parameter(n, kind, default=d) for n, d in names])


def _shared(classes: tuple[type[nn.Module], ...]) -> inspect.Signature:
    """The 1d, 2d and 3d classes' common signature: annotations where they agree."""
    signatures = [inspect.signature(c) for c in classes]
    params = []
    for p in signatures[1].parameters.values():
        same = all(s.parameters[p.name].annotation == p.annotation for s in signatures)
        params.append(p if same else p.replace(annotation=inspect.Parameter.empty))
    assert len({s.return_annotation for s in signatures}) == 1
    return signatures[1].replace(parameters=params)


def _expected(twin: type[di.Deferred]) -> inspect.Signature:
    real = twin._di_cls
    if real in RANK_GENERIC:
        full = _shared(real.classes)  # type: ignore[attr-defined]
    elif real in DOCUMENTED:
        full = _documented(real)
    else:
        full = inspect.signature(real)
    return _minus(full, twin._di_rules)


def test_every_twin_is_checked_here() -> None:
    assert len(TWIN_NAMES) == len([n for n in dnn.__all__ if n not in ("TWINS", "RANK_GENERIC")])


@pytest.mark.parametrize("name", TWIN_NAMES)
def test_twin_signature_is_exactly_torchs_minus_the_inferred_arguments(name: str) -> None:
    twin = getattr(dnn, name)
    shown = inspect.signature(twin)
    expected = _expected(twin)
    assert shown == expected, f"{name}: {shown} != {expected}"
    assert list(shown.parameters) == list(expected.parameters)  # the order too
    assert shown.return_annotation == expected.return_annotation


def test_linear_reads_exactly_like_torchs_including_the_return_annotation() -> None:
    full = inspect.signature(nn.Linear)
    expected = full.replace(
        parameters=[p for n, p in full.parameters.items() if n != "in_features"]
    )
    assert inspect.signature(dnn.Linear) == expected
    assert str(inspect.signature(dnn.Linear)).endswith("-> None")


class Block(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, *, scale: float = 2.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out * self.scale


def test_a_deferred_user_class_shows_its_signature_minus_the_inferred_argument() -> None:
    lazy = di.defer(Block, in_dim=di.dim(-1))
    assert inspect.signature(lazy) == _minus(inspect.signature(Block), {"in_dim"})
    # This module's annotations are strings (``from __future__ import annotations``).
    assert str(inspect.signature(lazy)) == "(out_dim: 'int', *, scale: 'float' = 2.0) -> 'None'"


@pytest.mark.parametrize(
    ("name", "option"), [("LayerNorm", "ndim"), ("RMSNorm", "ndim"), ("PReLU", "per_channel")]
)
def test_options_are_not_in_the_signature_but_named_in_the_docstring(
    name: str, option: str
) -> None:
    twin = getattr(dnn, name)
    assert option in twin._di_options
    assert option not in inspect.signature(twin).parameters
    doc = twin.__doc__ or ""
    default = twin._di_options[option]
    assert re.search(rf"``{option}={default!r}``", doc), doc


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.RMSNorm])
def test_the_ndim_option_still_normalizes_over_the_last_dims_bitwise(
    cls: type[nn.Module],
) -> None:
    x = torch.randn(2, 3, 4, 5)
    layer = getattr(dnn, cls.__name__)(ndim=2, eps=1e-3)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    eager = cls((4, 5), eps=1e-3)
    assert kind(layer) is cls and layer.normalized_shape == (4, 5)
    assert torch.equal(out, eager(x))


def test_the_per_channel_option_still_gives_one_parameter_per_channel_bitwise() -> None:
    x = torch.randn(2, 3, 5)
    layer = dnn.PReLU(per_channel=True, init=0.1)
    out = layer(x)
    eager = nn.PReLU(3, init=0.1)
    assert kind(layer) is nn.PReLU and layer.num_parameters == 3
    assert torch.equal(out, eager(x)) and torch.equal(layer.weight, eager.weight)
    default = dnn.PReLU()
    default(x)
    assert default.num_parameters == 1


def test_wrong_arguments_still_name_torchs_signature_and_the_inferred_argument() -> None:
    with pytest.raises(
        TypeError,
        match=r"^deferinit LayerNorm: got an unexpected keyword argument 'nidm'\. It takes the "
        r"arguments of torch\.nn\.LayerNorm\(normalized_shape: .*\) -> None except the "
        r"inferred 'normalized_shape'",
    ):
        dnn.LayerNorm(nidm=2)
    with pytest.raises(
        TypeError,
        match=r"^deferinit Linear: too many positional arguments\. It takes the arguments of "
        r"torch\.nn\.Linear\(in_features: int, out_features: int, .*except the inferred "
        r"'in_features'",
    ):
        dnn.Linear(1, 2, 3, 4, 5)
