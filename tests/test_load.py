"""``di.load_state_dict`` (docs/design.md §2, §3.7; issue 5 item 4, issue 8 item 3): a checkpoint
without a random initialization first.

The source is a state dict, a ``.safetensors`` file or a torch file (read with
``weights_only=True``). On an unbuilt model the sizes come from the checkpoint; unbuilt
and meta-built layers are built on meta and given the values (no random init). A dict's
tensors are copied, as torch's ``load_state_dict`` does (``assign=True`` takes them);
a file's tensors are taken without a second copy. Mismatches raise
``di.DeferredInitError`` listing the offending keys and leave the model as it was. The
attacks (bad values, corrupt files, crafted pickles, interrupts) are in
``test_checkpoint_attacks.py``.
"""

from __future__ import annotations

import os
import pickle
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

import deferinit as di
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]
StateDict = dict[str, torch.Tensor]
UNINITIALIZED = (UninitializedParameter, UninitializedBuffer)


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """A user's block: its input size is a constructor argument."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(torch.relu(self.proj(x)))
        return out


LazyBlock = di.defer(Block, in_dim=di.dim(-1))


@dataclass(frozen=True)
class Case:
    name: str
    eager: Callable[[], nn.Module]
    deferred: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _linear(module: nn.Module) -> nn.Linear:
    assert type(module) is nn.Linear
    return module


def _indexable(module: nn.Module) -> nn.Sequential:
    assert isinstance(module, nn.Sequential)
    return module


CASES = [
    Case(
        "mlp",
        lambda: _seq(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)),
        lambda: _seq(dnn.Linear(16), nn.ReLU(), dnn.Linear(4)),
        lambda: (torch.randn(3, 20),),
    ),
    Case(
        "conv-batchnorm",
        lambda: _seq(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 5),
            nn.BatchNorm1d(5),
        ),
        lambda: _seq(
            dnn.Conv2d(4, 3),
            dnn.BatchNorm2d(),
            nn.ReLU(),
            nn.Flatten(),
            dnn.Linear(5),
            dnn.BatchNorm1d(),
        ),
        lambda: (torch.randn(2, 3, 6, 6),),
    ),
    Case(
        "lstm",
        lambda: nn.LSTM(10, 12, num_layers=2),
        lambda: dnn.LSTM(12, num_layers=2),
        lambda: (torch.randn(5, 3, 10),),
    ),
    Case(
        "multihead-attention",
        lambda: nn.MultiheadAttention(8, 2),
        lambda: dnn.MultiheadAttention(num_heads=2),
        lambda: (torch.randn(4, 2, 8),) * 3,
    ),
    Case(
        "transformer-encoder-layer",
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0),
        lambda: dnn.TransformerEncoderLayer(nhead=2, dim_feedforward=16, dropout=0.0),
        lambda: (torch.randn(4, 2, 8),),
    ),
    Case(
        "layernorm-ndim2",
        lambda: nn.LayerNorm((3, 5)),
        lambda: dnn.LayerNorm(ndim=2),
        lambda: (torch.randn(2, 3, 5),),
    ),
    Case(
        "defer-user-block",
        lambda: _seq(Block(6, 7), nn.Linear(7, 2)),
        lambda: _seq(LazyBlock(out_dim=7), dnn.Linear(2)),
        lambda: (torch.randn(2, 6),),
    ),
]
CASE_IDS = [c.name for c in CASES]


def _trained(case: Case) -> nn.Module:
    """The eager model with values no initializer gives: a load that did not happen
    (or a random init) cannot pass for one that did."""
    torch.manual_seed(1234)
    eager = case.eager().eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p))
        for name, b in eager.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(7)
            elif b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    return eager


def _clone(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def _assert_equal_outputs(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, want)
    elif isinstance(want, tuple | list):
        assert isinstance(got, tuple | list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_equal_outputs(g, w)
    else:
        assert got == want


def _assert_holds(module: nn.Module, want: Mapping[str, torch.Tensor]) -> None:
    """Every tensor is real (not meta, not a placeholder) and equals the checkpoint's."""
    got = module.state_dict()
    assert list(got) == list(want)
    for key, expected in want.items():
        actual = got[key]
        assert not isinstance(actual, UNINITIALIZED), key
        assert actual.device.type == "cpu", key
        assert actual.dtype == expected.dtype, key
        assert actual.shape == expected.shape, key
        assert torch.equal(actual, expected), key


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _meta_built(case: Case) -> nn.Module:
    model = di.build(case.deferred(), *case.inputs(), device="meta")
    assert di.is_built(model)
    assert all(t.device.type == "meta" for t in _tensors(model).values())
    return model


# --------------------------------------------------------------------------- sources

Source = Callable[[Mapping[str, torch.Tensor], Path], Any]


def _as_dict(state: Mapping[str, torch.Tensor], tmp: Path) -> Any:
    return dict(state)


def _safetensors(as_str: bool) -> Source:
    def make(state: Mapping[str, torch.Tensor], tmp: Path) -> Any:
        path = tmp / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return str(path) if as_str else path

    return make


def _torch_file(as_str: bool, suffix: str) -> Source:
    def make(state: Mapping[str, torch.Tensor], tmp: Path) -> Any:
        path = tmp / f"model{suffix}"
        torch.save(dict(state), path)
        return str(path) if as_str else path

    return make


SOURCES: dict[str, Source] = {
    "dict": _as_dict,
    "safetensors-str": _safetensors(True),
    "safetensors-path": _safetensors(False),
    "torch-str": _torch_file(True, ".pt"),
    "torch-path": _torch_file(False, ".pt"),
    "torch-bin-path": _torch_file(False, ".bin"),
}


@pytest.fixture(params=list(SOURCES))
def make_source(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[StateDict], Any]:
    """``make_source(state)``: the state dict as this test's kind of source."""
    maker = SOURCES[request.param]
    return lambda state: maker(state, tmp_path)


# --------------------------------------------------------------------------- unbuilt


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unbuilt_model_takes_sizes_and_values_from_the_checkpoint(
    case: Case, make_source: Callable[[StateDict], Any], assert_same_state: AssertSameState
) -> None:
    eager = _trained(case)
    want = _clone(eager.state_dict())
    model = case.deferred()
    assert not di.is_built(model)

    result = di.load_state_dict(model, make_source(eager.state_dict()))

    assert (result.missing_keys, result.unexpected_keys) == ([], [])  # torch's _IncompatibleKeys
    assert di.is_built(model) and di.pending(model) == []
    assert repr(model) == repr(eager)  # every size inferred, exactly torch's classes
    assert [type(m) for m in model.modules()] == [type(m) for m in eager.modules()]
    _assert_holds(model, want)
    assert_same_state(model, eager)
    model.eval()
    inputs = case.inputs()
    with torch.no_grad():
        _assert_equal_outputs(model(*inputs), eager(*inputs))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_loading_into_an_unbuilt_model_draws_no_random_numbers(case: Case) -> None:
    state = _clone(_trained(case).state_dict())
    model = case.deferred()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    di.load_state_dict(model, state)
    assert torch.equal(torch.get_rng_state(), before), "a random init ran before the load"
    assert di.is_built(model)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unbuilt_model_copies_a_dict_and_shares_it_only_with_assign(case: Case) -> None:
    # As torch's load_state_dict: the caller's tensors are copied, never aliased;
    # assign=True takes them (their storage) instead.
    state = _clone(_trained(case).state_dict())
    pointers = {k: v.data_ptr() for k, v in state.items()}
    model = case.deferred()
    di.load_state_dict(model, state)
    got = model.state_dict()
    assert list(got) == list(pointers)
    for key, pointer in pointers.items():
        assert got[key].data_ptr() != pointer, f"{key} aliases the caller's tensor"
    assigned = case.deferred()
    di.load_state_dict(assigned, state, assign=True)
    for key, tensor in assigned.state_dict().items():
        assert tensor.data_ptr() == pointers[key], f"{key} was copied despite assign=True"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_callers_state_dict_is_left_as_it_was(case: Case) -> None:
    # Loading takes the checkpoint's *storage*; the caller's dict must keep its own
    # tensor objects, on their device, with their values.
    state = _clone(_trained(case).state_dict())
    objects = dict(state)
    want = _clone(state)
    di.load_state_dict(case.deferred(), state)
    assert list(state) == list(want)
    for key, expected in want.items():
        assert state[key] is objects[key], key
        assert state[key].device.type == "cpu", f"the caller's {key!r} became meta"
        assert torch.equal(state[key], expected), key


@pytest.mark.parametrize("meta", [False, True], ids=["unbuilt", "meta-built"])
def test_loading_another_models_own_tensors_leaves_that_model_working(meta: bool) -> None:
    # state_dict(keep_vars=True) hands out the source model's own parameter and
    # buffer objects: loading from it must not move them to meta.
    case = CASES[1]  # conv + batch norm: buffers as well as parameters
    source = _trained(case)
    tensors = _tensors(source)
    model = _meta_built(case) if meta else case.deferred()
    di.load_state_dict(model, source.state_dict(keep_vars=True))
    for key, tensor in _tensors(source).items():
        assert tensor is tensors[key], key
        assert tensor.device.type == "cpu", f"the source model's {key!r} became meta"
    x = case.inputs()[0]
    with torch.no_grad():
        assert torch.equal(source(x), model.eval()(x))


def test_optimizer_created_before_loading_holds_the_loaded_parameters() -> None:
    eager = _trained(CASES[0])
    model = _indexable(CASES[0].deferred())
    placeholders = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    di.load_state_dict(model, _clone(eager.state_dict()))

    assert [p is q for p, q in zip(model.parameters(), placeholders, strict=True)] == [True] * 4
    linear = model[0]
    assert type(linear) is nn.Linear and type(linear.weight) is nn.Parameter
    held = optimizer.param_groups[0]["params"]
    assert all(h is p for h, p in zip(held, model.parameters(), strict=True))
    before = linear.weight.detach().clone()
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    assert not torch.equal(linear.weight, before), "the optimizer trains the loaded weight"


@pytest.mark.parametrize("meta", [False, True], ids=["unbuilt", "meta-built"])
def test_a_weakly_referenced_parameter_keeps_its_object_and_takes_the_values(meta: bool) -> None:
    want = _clone(_trained(CASES[0]).state_dict())
    model = _meta_built(CASES[0]) if meta else _indexable(CASES[0].deferred())
    weight = next(iter(model.parameters()))
    seen = weakref.ref(weight)
    weight.note = "mine"  # type: ignore[attr-defined]

    di.load_state_dict(model, _clone(want))

    assert seen() is weight is next(iter(model.parameters()))
    assert weight.note == "mine"  # type: ignore[attr-defined]
    _assert_holds(model, want)


def test_a_gradient_hook_registered_on_a_meta_built_model_fires_after_loading() -> None:
    # (A placeholder refuses register_hook, as torch's Lazy modules do.)
    want = _clone(_trained(CASES[0]).state_dict())
    model = _meta_built(CASES[0])
    weight = next(iter(model.parameters()))
    fired: list[torch.Size] = []
    weight.register_hook(lambda g: fired.append(g.shape))

    di.load_state_dict(model, _clone(want))
    model(torch.randn(4, 20)).sum().backward()

    assert fired == [weight.shape]


def test_requires_grad_set_before_loading_carries_over() -> None:
    model = _seq(dnn.Linear(16), nn.ReLU(), dnn.Linear(4))
    model[0].requires_grad_(False)
    di.load_state_dict(model, _clone(_trained(CASES[0]).state_dict()))
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


def test_a_checkpoint_of_another_dtype_is_converted_to_the_models_dtype() -> None:
    eager = _trained(CASES[0]).double()
    model = CASES[0].deferred()
    di.load_state_dict(model, _clone(eager.state_dict()))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.float()), key


def test_a_double_model_loads_a_float_checkpoint_in_float64_as_eager() -> None:
    # docs/design.md §3.2: .double() before the build carries over. Eager torch loads a float32
    # checkpoint into a .double()'d model in float64.
    state = _clone(_trained(CASES[0]).state_dict())
    eager = CASES[0].eager().double()
    eager.load_state_dict(state)
    model = CASES[0].deferred().double()
    di.load_state_dict(model, state)
    assert [p.dtype for p in model.parameters()] == [p.dtype for p in eager.parameters()]
    assert [p.dtype for p in model.parameters()] == [torch.float64] * 4


def test_multihead_attention_with_other_key_and_value_sizes_from_the_checkpoint() -> None:
    # Projection names depend on kdim/vdim (docs/decisions.md): given explicitly, the
    # placeholders carry q/k/v_proj_weight, and embed_dim comes from the checkpoint.
    torch.manual_seed(0)
    eager = nn.MultiheadAttention(8, 2, kdim=6, vdim=5).eval()
    model = dnn.MultiheadAttention(num_heads=2, kdim=6, vdim=5)
    di.load_state_dict(model, _clone(eager.state_dict()))
    assert repr(model) == repr(eager)
    _assert_holds(model, eager.state_dict())
    q, k, v = torch.randn(4, 2, 8), torch.randn(3, 2, 6), torch.randn(3, 2, 5)
    with torch.no_grad():
        _assert_equal_outputs(model.eval()(q, k, v), eager(q, k, v))


# --------------------------------------------------------------------------- meta-built


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_meta_built_model_takes_copies_of_the_checkpoint_tensors(case: Case) -> None:
    eager = _trained(case)
    state = _clone(eager.state_dict())
    want = _clone(state)
    pointers = {k: v.data_ptr() for k, v in state.items()}
    model = _meta_built(case)
    before = torch.get_rng_state()

    di.load_state_dict(model, state)

    assert torch.equal(torch.get_rng_state(), before), "a random init ran before the load"
    _assert_holds(model, want)
    got = model.state_dict()
    for key, pointer in pointers.items():
        assert got[key].data_ptr() != pointer, f"{key} aliases the caller's tensor"
    inputs = case.inputs()
    with torch.no_grad():
        _assert_equal_outputs(model.eval()(*inputs), eager(*inputs))


@pytest.mark.parametrize("source", ["dict", "safetensors-path", "torch-str"])
def test_meta_built_model_loads_from_every_kind_of_source(source: str, tmp_path: Path) -> None:
    case = CASES[1]  # conv + batch norm: parameters and buffers of two dtypes
    eager = _trained(case)
    want = _clone(eager.state_dict())
    model = _meta_built(case)
    di.load_state_dict(model, SOURCES[source](_clone(want), tmp_path))
    _assert_holds(model, want)


def test_meta_built_linear_keeps_its_parameter_objects() -> None:
    eager = _trained(CASES[0])
    model = _meta_built(CASES[0])
    params = list(model.parameters())
    optimizer = torch.optim.Adam(model.parameters())
    di.load_state_dict(model, _clone(eager.state_dict()))
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    held = optimizer.param_groups[0]["params"]
    assert all(h is p for h, p in zip(held, model.parameters(), strict=True))
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())


def test_meta_built_model_leaves_the_callers_state_dict_as_it_was() -> None:
    state = _clone(_trained(CASES[1]).state_dict())
    objects = dict(state)
    model = _meta_built(CASES[1])
    di.load_state_dict(model, state)
    for key, tensor in state.items():
        assert tensor is objects[key], key
        assert tensor.device.type == "cpu", f"the caller's {key!r} became meta"


def test_layer_constructed_on_meta_without_deferinit_takes_the_values() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    weight = model.weight
    state = _clone(nn.Linear(3, 2).state_dict())
    di.load_state_dict(model, state)
    assert model.weight is weight and model.weight.device.type == "cpu"
    assert model.weight.data_ptr() != state["weight"].data_ptr()
    assert torch.equal(model.weight, state["weight"])
    assert torch.equal(model.bias, state["bias"])


# --------------------------------------------------------------------------- mixed and built


def test_mix_of_real_and_deferred_layers() -> None:
    torch.manual_seed(0)
    eager = _seq(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    state = _clone(eager.state_dict())
    pointers = {k: v.data_ptr() for k, v in state.items()}

    real = nn.Linear(20, 16)  # a real layer with its own memory
    built = dnn.Linear(8)  # built by deferinit from a forward
    built(torch.randn(1, 16))
    model = _seq(real, nn.ReLU(), built, nn.ReLU(), dnn.Linear(4))
    real_weight, real_pointer = real.weight, real.weight.data_ptr()
    built_weight = built.weight

    di.load_state_dict(model, state)

    assert di.is_built(model) and repr(model) == repr(eager)
    _assert_holds(model, eager.state_dict())
    # Layers that hold memory are copied into, in place, as torch's load_state_dict does.
    assert real.weight is real_weight and real.weight.data_ptr() == real_pointer
    assert built.weight is built_weight
    # The deferred layer takes copies: the caller's dict is never aliased.
    assert _linear(model[4]).weight.data_ptr() != pointers["4.weight"]
    x = torch.randn(3, 20)
    assert torch.equal(model(x), eager(x))


def test_mix_of_real_and_meta_built_layers() -> None:
    torch.manual_seed(0)
    eager = _seq(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    state = _clone(eager.state_dict())
    model = di.build(_seq(nn.Linear(20, 16), nn.ReLU(), dnn.Linear(4)), (2, 20), device="meta")
    assert model[0].weight.device.type == "cpu" and model[2].weight.device.type == "meta"
    di.load_state_dict(model, state)
    _assert_holds(model, eager.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(model(x), eager(x))


def test_fully_built_model_is_loaded_in_place() -> None:
    eager = _trained(CASES[1])
    model = CASES[1].deferred()
    model(torch.randn(2, 3, 6, 6))  # built with real, random memory
    tensors = _tensors(model)
    pointers = {k: t.data_ptr() for k, t in tensors.items()}
    di.load_state_dict(model, _clone(eager.state_dict()))
    _assert_holds(model, eager.state_dict())
    assert all(_tensors(model)[k] is t for k, t in tensors.items())
    assert {k: t.data_ptr() for k, t in _tensors(model).items()} == pointers


def test_loading_twice_replaces_the_values() -> None:
    model = CASES[0].deferred()
    di.load_state_dict(model, _clone(CASES[0].eager().state_dict()))
    second = _trained(CASES[0])
    di.load_state_dict(model, _clone(second.state_dict()))
    _assert_holds(model, second.state_dict())


# --------------------------------------------------------------------------- strict errors


def _mlp_state() -> StateDict:
    return _clone(_trained(CASES[0]).state_dict())


BAD: dict[str, tuple[Callable[[StateDict], StateDict], list[str]]] = {
    "missing": (lambda s: {k: v for k, v in s.items() if k != "2.bias"}, ["missing", "2.bias"]),
    "unexpected": (
        lambda s: {**s, "3.weight": torch.zeros(2, 2), "extra": torch.zeros(1)},
        ["unexpected", "3.weight", "extra"],
    ),
    "misshaped-weight": (
        lambda s: {**s, "2.weight": torch.zeros(8, 16)},
        ["2.weight", "(8, 16)"],
    ),
    "misshaped-bias": (lambda s: {**s, "0.bias": torch.zeros(17)}, ["0.bias", "(17,)"]),
    "missing-and-unexpected": (
        lambda s: {("layer." + k if k.startswith("2.") else k): v for k, v in s.items()},
        ["missing", "unexpected", "2.weight", "2.bias", "layer.2.weight", "layer.2.bias"],
    ),
}


def _facts(tensor: torch.Tensor) -> tuple[Any, ...]:
    unknown = isinstance(tensor, UNINITIALIZED)  # a placeholder has no shape yet
    shape = None if unknown else tuple(tensor.shape)
    return (type(tensor), tensor.device, tensor.dtype, tensor.requires_grad, shape)


def _snapshot(model: nn.Module) -> tuple[str, list[type], dict[str, torch.Tensor], list[Any]]:
    tensors = _tensors(model)
    return (
        repr(model),
        [type(m) for m in model.modules()],
        tensors,
        [_facts(t) for t in tensors.values()],
    )


def _assert_unchanged(
    model: nn.Module, before: tuple[str, list[type], dict[str, torch.Tensor], list[Any]]
) -> None:
    text, types, tensors, facts = before
    assert repr(model) == text
    assert [type(m) for m in model.modules()] == types
    now = _tensors(model)
    assert list(now) == list(tensors)
    assert all(now[k] is t for k, t in tensors.items()), "placeholder objects replaced"
    assert [_facts(t) for t in now.values()] == facts


@pytest.mark.parametrize("bad", list(BAD))
def test_strict_mismatch_into_unbuilt_model_raises_and_changes_nothing(bad: str) -> None:
    corrupt, words = BAD[bad]
    model = CASES[0].deferred()
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, corrupt(_mlp_state()))
    for word in words:
        assert word in str(caught.value)
    assert not di.is_built(model) and di.pending(model) == ["0", "2"]
    assert all(isinstance(p, UNINITIALIZED) for p in model.parameters())
    _assert_unchanged(model, before)
    # A checkpoint that fits loads afterwards.
    state = _mlp_state()
    di.load_state_dict(model, state)
    _assert_holds(model, state)


@pytest.mark.parametrize("bad", list(BAD))
def test_strict_mismatch_into_meta_built_model_raises_and_changes_nothing(bad: str) -> None:
    corrupt, words = BAD[bad]
    model = _meta_built(CASES[0])
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, corrupt(_mlp_state()))
    for word in words:
        assert word in str(caught.value)
    _assert_unchanged(model, before)
    assert all(t.device.type == "meta" for t in model.parameters())


@pytest.mark.parametrize("bad", ["misshaped-weight", "misshaped-bias"])
def test_size_mismatch_raises_even_when_not_strict(bad: str) -> None:
    corrupt, words = BAD[bad]
    model = CASES[0].deferred()
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, corrupt(_mlp_state()), strict=False)
    for word in words:
        assert word in str(caught.value)
    _assert_unchanged(model, before)


def test_strict_mismatch_into_mixed_model_leaves_the_real_layer_untouched() -> None:
    real = nn.Linear(20, 16)
    model = _seq(real, nn.ReLU(), dnn.Linear(4))
    values = real.weight.detach().clone()
    before = _snapshot(model)
    state = {k: v for k, v in _mlp_state().items() if k != "2.bias"}
    with pytest.raises(di.DeferredInitError, match=r"2\.bias"):
        di.load_state_dict(model, state)
    _assert_unchanged(model, before)
    assert torch.equal(real.weight, values), "the real layer was written before the check"


def test_saved_tensors_that_disagree_on_a_size_are_named() -> None:
    model = _seq(dnn.Linear(4), dnn.LayerNorm(ndim=2))
    before = _snapshot(model)
    state = {
        "0.weight": torch.ones(4, 3),
        "0.bias": torch.ones(4),
        "1.weight": torch.ones(3, 5),
        "1.bias": torch.ones(3, 4),
    }
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, state)
    message = str(caught.value)
    assert "weight" in message and "bias" in message and "normalized_shape" in message
    assert "'1" in message  # the layer's qualified name
    _assert_unchanged(model, before)
    assert not di.is_built(model)


def test_a_saved_tensor_of_the_wrong_rank_is_an_error() -> None:
    model = CASES[0].deferred()
    before = _snapshot(model)
    state = {**_mlp_state(), "0.weight": torch.zeros(16)}
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, state)
    message = str(caught.value)
    assert "weight" in message and "'0" in message  # the key and its layer
    # What was saved is shown, not an internal sentinel ("weight says -1").
    assert "(16,)" in message and "-1" not in message, message
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- strict=False


def test_not_strict_leaves_layers_without_keys_deferred() -> None:
    eager = _indexable(_trained(CASES[0]))
    state = {k: v for k, v in _clone(eager.state_dict()).items() if k.startswith("0.")}
    model = _indexable(CASES[0].deferred())
    placeholders = list(model[2].parameters())

    di.load_state_dict(model, state, strict=False)

    assert di.pending(model) == ["2"]
    assert repr(model[0]) == repr(eager[0])
    assert torch.equal(_linear(model[0]).weight, _linear(eager[0]).weight)
    assert all(p is q for p, q in zip(model[2].parameters(), placeholders, strict=True))
    assert all(isinstance(p, UNINITIALIZED) for p in model[2].parameters())
    # The deferred layer still builds from data later.
    assert model(torch.randn(3, 20)).shape == (3, 4)
    assert di.is_built(model)


def test_not_strict_skips_unexpected_keys() -> None:
    eager = _trained(CASES[0])
    state = {**_clone(eager.state_dict()), "3.weight": torch.zeros(2), "head.bias": torch.ones(3)}
    model = CASES[0].deferred()
    di.load_state_dict(model, state, strict=False)
    assert di.is_built(model)
    _assert_holds(model, eager.state_dict())
    assert "3.weight" not in model.state_dict()


def test_not_strict_into_meta_built_model_leaves_missing_tensors_on_meta() -> None:
    eager = _indexable(_trained(CASES[0]))
    state = {k: v for k, v in _clone(eager.state_dict()).items() if k.startswith("0.")}
    model = _indexable(_meta_built(CASES[0]))
    di.load_state_dict(model, state, strict=False)
    assert model[0].weight.device.type == "cpu"
    assert torch.equal(_linear(model[0]).weight, _linear(eager[0]).weight)
    assert model[2].weight.device.type == "meta" and model[2].bias.device.type == "meta"


# --------------------------------------------------------------------------- sources refused


class _Payload:
    """What a malicious checkpoint holds: unpickling it calls ``os.mkdir``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_a_torch_file_holding_a_whole_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_trained(CASES[0]), path)  # the model object, not its state dict
    model = CASES[0].deferred()
    before = _snapshot(model)
    with pytest.raises(
        di.DeferredInitError, match=r"model.pt.*other than tensors.*GLOBAL torch.nn.*Sequential\)"
    ) as caught:
        di.load_state_dict(model, path)
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
    _assert_unchanged(model, before)


def test_a_torch_file_runs_no_code_from_the_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"0.weight": _Payload(marker)}, path)
    model = CASES[0].deferred()
    with pytest.raises(di.DeferredInitError, match="evil.pt.*nothing in it ran"):
        di.load_state_dict(model, str(path))
    assert not marker.exists(), "the checkpoint executed code"
    assert not di.is_built(model)


def test_a_torch_file_holding_no_state_dict_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tensors.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(di.DeferredInitError, match="list.*not a state dict"):
        di.load_state_dict(CASES[0].deferred(), path)


@pytest.mark.parametrize("name", ["missing.pt", "missing.safetensors", "missing.bin"])
@pytest.mark.parametrize("as_str", [True, False], ids=["str", "path"])
def test_a_missing_file_is_file_not_found(tmp_path: Path, name: str, as_str: bool) -> None:
    path = tmp_path / name
    model = CASES[0].deferred()
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match=name):
        di.load_state_dict(model, str(path) if as_str else path)
    _assert_unchanged(model, before)


def test_a_directory_is_not_a_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        di.load_state_dict(CASES[0].deferred(), tmp_path)


@pytest.mark.parametrize(
    "thing",
    [[nn.Linear(2, 2)], "model", None, {"0.weight": torch.zeros(1)}],
    ids=["list", "str", "none", "state-dict-first"],
)
def test_something_not_a_module_is_a_type_error(thing: Any) -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        di.load_state_dict(thing, _mlp_state())


def test_multihead_attention_with_unknown_key_sizes_takes_them_from_a_q_k_v_checkpoint() -> None:
    # kdim/vdim are read off k_proj_weight/v_proj_weight (test_load_attention_kdim.py).
    eager = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    model = dnn.MultiheadAttention(num_heads=2)
    di.load_state_dict(model, eager.state_dict())
    assert (model.kdim, model.vdim) == (6, 5) and di.pending(model) == []
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in eager.state_dict().items())


def test_multihead_attention_refuses_a_q_k_v_checkpoint_that_contradicts_its_kdim() -> None:
    eager = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    model = dnn.MultiheadAttention(num_heads=2, kdim=4, vdim=5)  # fixed: not the saved 6
    with pytest.raises(di.DeferredInitError, match=r"k_proj_weight"):
        di.load_state_dict(model, eager.state_dict())
