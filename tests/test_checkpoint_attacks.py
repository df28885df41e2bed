"""Checkpoints under attack (issue 8 items 3, 8, 11; docs/design.md §3.7, §3.10).

``di.load_state_dict`` is all or nothing and never aliases: every key, value type,
shape and dtype is checked before anything is written; any error, an interrupt
included, leaves the model bitwise as it was (built: same values; unbuilt: still
deferred, same placeholder objects); a dict's tensors are copied unless
``assign=True``; corrupt files and crafted pickles are refused with a
``DeferredInitError`` naming the file, and no code from them runs.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.nn.parameter import is_lazy

import deferinit as di
from deferinit import nn as dnn

StateDict = dict[str, torch.Tensor]
KINDS = ["unbuilt", "meta-built", "built"]


# --------------------------------------------------------------------------- models


def _eager() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _deferred() -> nn.Sequential:
    return nn.Sequential(dnn.Linear(16), nn.ReLU(), dnn.Linear(4))


def _model(kind: str) -> nn.Sequential:
    model = _deferred()
    if kind == "meta-built":
        di.build(model, (2, 20), device="meta")
    elif kind == "built":
        torch.manual_seed(7)
        model(torch.randn(2, 20))
    return model


def _weight(model: nn.Module, index: str) -> torch.Tensor:
    layer = model.get_submodule(index)
    assert isinstance(layer, nn.Linear)
    return layer.weight


def _saved(seed: int = 1) -> StateDict:
    """A checkpoint no initializer would give: a load that did not happen shows."""
    torch.manual_seed(seed)
    eager = _eager()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn_like(p))
    return {k: v.detach().clone() for k, v in eager.state_dict().items()}


Snapshot = tuple[str, list[type], list[tuple[str, torch.Tensor, type, torch.Tensor | None]]]


def _snapshot(model: nn.Module) -> Snapshot:
    """Classes, repr, tensor objects (by name) and a copy of every real value."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return (
        repr(model),
        [type(m) for m in model.modules()],
        [
            (
                name,
                t,
                type(t),
                None if is_lazy(t) or t.device.type == "meta" else t.detach().clone(),
            )
            for name, t in tensors
        ],
    )


def _assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    text, types, tensors = before
    assert repr(model) == text
    assert [type(m) for m in model.modules()] == types
    now = [*model.named_parameters(), *model.named_buffers()]
    assert [n for n, _ in now] == [n for n, *_ in tensors]
    for (name, tensor), (_, was, cls, values) in zip(now, tensors, strict=True):
        assert tensor is was, f"{name}: the tensor object was replaced"
        assert type(tensor) is cls, name
        if values is None:
            assert is_lazy(tensor) or tensor.device.type == "meta", f"{name} was written"
        else:
            assert torch.equal(tensor, values), f"{name}: values changed"


def _assert_loaded(model: nn.Module, want: StateDict) -> None:
    got = model.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].device.type == "cpu", key
        assert torch.equal(got[key], value.to(got[key].dtype)), key


# --------------------------------------------------------------------------- values


BAD_VALUES: dict[str, tuple[Callable[[torch.Tensor], Any], str]] = {
    "meta": (lambda t: t.to("meta"), "meta tensor, which holds no values"),
    "sparse": (lambda t: t.to_sparse(), "sparse_coo tensor; only dense"),
    "int": (lambda t: 3, "holds a int, not a tensor"),
    "string": (lambda t: "weights", "holds a str, not a tensor"),
    "none": (lambda t: None, "holds a NoneType, not a tensor"),
    "list": (lambda t: t.tolist(), "holds a list, not a tensor"),
    "complex": (lambda t: t.to(torch.complex64), "drop the imaginary part"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_a_bad_value_after_good_keys_is_refused_and_nothing_is_written(kind: str, bad: str) -> None:
    # The bad value is the last key: the keys before it pass every check, and
    # used to be written before the bad one failed.
    make, words = BAD_VALUES[bad]
    state: dict[str, Any] = _saved()
    state["2.bias"] = make(state["2.bias"])
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError, match="2.bias") as caught:
        di.load_state_dict(model, state)
    assert words in str(caught.value)
    _assert_unchanged(model, before)
    # A good checkpoint loads afterwards.
    good = _saved()
    di.load_state_dict(model, good)
    _assert_loaded(model, good)


@pytest.mark.parametrize("kind", KINDS)
def test_every_bad_value_is_listed_in_one_error(kind: str) -> None:
    state: dict[str, Any] = _saved()
    state["0.weight"] = state["0.weight"].to("meta")
    state["0.bias"] = "zeros"
    state["2.weight"] = state["2.weight"].to_sparse()
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, state)
    for key in ("0.weight", "0.bias", "2.weight"):
        assert repr(key) in str(caught.value)
    _assert_unchanged(model, before)


def test_a_fake_tensor_is_refused() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    state: dict[str, Any] = _saved()
    with FakeTensorMode() as mode:
        state["2.bias"] = mode.from_tensor(state["2.bias"])
    model = _model("unbuilt")
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError, match="'2.bias' is a fake tensor"):
        di.load_state_dict(model, state)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_of_another_dtype_converts_as_torchs_load_state_dict(kind: str) -> None:
    # torch's load_state_dict copies into the model's parameters (Tensor.copy_): the
    # model's dtype is kept. Unbuilt and meta-built layers do the same.
    state = {k: v.double() for k, v in _saved().items()}
    eager = _eager()
    eager.load_state_dict(state)
    model = _model(kind)
    di.load_state_dict(model, state)
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 4
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --------------------------------------------------------------------------- aliasing


@pytest.mark.parametrize("kind", KINDS)
def test_the_loaded_model_and_the_callers_dict_never_share_memory(kind: str) -> None:
    state = _saved()
    want = {k: v.clone() for k, v in state.items()}
    model = _model(kind)
    di.load_state_dict(model, state)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for key, value in want.items():
        assert torch.equal(state[key], value), f"training the model changed the caller's {key}"
    for value in state.values():
        value.zero_()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[key] + 1), f"the caller's dict changed the model's {key}"


@pytest.mark.parametrize("kind", KINDS)
def test_two_keys_holding_one_tensor_never_become_tied_parameters(kind: str) -> None:
    model = nn.Sequential(dnn.Linear(6), dnn.Linear(6))
    if kind == "meta-built":
        di.build(model, (1, 6), device="meta")
    elif kind == "built":
        model(torch.randn(1, 6))
    shared = torch.randn(6, 6)
    state = {
        "0.weight": shared,
        "0.bias": torch.zeros(6),
        "1.weight": shared,
        "1.bias": torch.ones(6),
    }
    di.load_state_dict(model, state)
    first, second = _weight(model, "0"), _weight(model, "1")
    assert first is not second
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    with torch.no_grad():
        first.add_(1.0)
    assert torch.equal(second, shared) and torch.equal(first, shared + 1)
    assert len(list(model.parameters())) == 4  # eager counts: no tie


@pytest.mark.parametrize("kind", KINDS)
def test_assign_takes_the_callers_tensors_under_the_models_parameter_objects(kind: str) -> None:
    # torch's assign=True: the module takes the state dict's tensors, with their
    # dtype; requires_grad stays the module's. deferinit keeps its parameter objects.
    state = {k: v.double() for k, v in _saved().items()}
    eager = _eager()
    eager.get_submodule("0").requires_grad_(False)
    eager.load_state_dict(state, assign=True)
    model = _model(kind)
    model.get_submodule("0").requires_grad_(False)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    di.load_state_dict(model, state, assign=True)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    got = model.state_dict()
    for key, value in state.items():
        assert got[key].data_ptr() == value.data_ptr(), f"{key}: assign=True copied"
    assert [p.dtype for p in model.parameters()] == [p.dtype for p in eager.parameters()]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert all(type(p) is nn.Parameter for p in model.parameters())
    saved = state["2.weight"].clone()
    model(torch.randn(3, 20, dtype=torch.float64)).sum().backward()
    optimizer.step()  # trains through the objects made before, on the caller's storage
    assert not torch.equal(_weight(model, "2"), saved)
    assert torch.equal(state["2.weight"], _weight(model, "2"))


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("kind", KINDS)
def test_an_optimizer_made_before_loading_trains_the_loaded_model(kind: str) -> None:
    model = _model(kind)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = _saved()
    di.load_state_dict(model, state)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    after = list(model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("kind", ["unbuilt", "meta-built"])
def test_a_recurrent_layer_keeps_its_parameter_objects(kind: str) -> None:
    # RNNs hold their weights by weak reference, which blocks tensor swaps.
    torch.manual_seed(0)
    eager = nn.LSTM(5, 6)
    model = dnn.LSTM(6)
    if kind == "meta-built":
        di.build(model, (3, 2, 5), device="meta")
    params = list(model.parameters())
    di.load_state_dict(model, eager.state_dict())
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))
    x = torch.randn(3, 2, 5)
    assert torch.equal(model(x)[0], eager(x)[0])


# --------------------------------------------------------------------------- unbuilt saves


def _unbuilt_state() -> dict[str, Any]:
    return _deferred().state_dict()


def _assert_still_deferred(model: nn.Module, placeholders: list[nn.Parameter]) -> None:
    assert di.pending(model) == ["0", "2"]
    assert all(p is q for p, q in zip(model.parameters(), placeholders, strict=True))
    assert all(is_lazy(p) for p in model.parameters())


@pytest.mark.parametrize("route", ["di", "torch", "torch-file", "di-file"])
def test_a_state_dict_saved_before_the_build_leaves_an_unbuilt_model_deferred(
    route: str, tmp_path: Path
) -> None:
    state = _unbuilt_state()
    assert all(is_lazy(v) for v in state.values())
    if route.endswith("file"):
        path = tmp_path / "unbuilt.pt"
        torch.save(state, path)
        state = torch.load(path, weights_only=True)
        assert all(is_lazy(v) for v in state.values())
    model = _deferred()
    placeholders = list(model.parameters())
    if route == "di-file":
        result = di.load_state_dict(model, tmp_path / "unbuilt.pt")
    elif route.startswith("di"):
        result = di.load_state_dict(model, state)
    else:
        result = model.load_state_dict(state)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    _assert_still_deferred(model, placeholders)
    assert model(torch.randn(2, 20)).shape == (2, 4)  # builds from data later


@pytest.mark.parametrize("kind", ["meta-built", "built"])
def test_a_state_dict_saved_before_the_build_is_refused_by_a_built_model(kind: str) -> None:
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError, match=r"0\.weight.*placeholder.*no values"):
        di.load_state_dict(model, _unbuilt_state())
    _assert_unchanged(model, before)


def test_a_layer_with_values_for_some_tensors_and_placeholders_for_others_is_refused() -> None:
    state = {**_saved(), "2.bias": _unbuilt_state()["2.bias"]}
    model = _model("unbuilt")
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError, match=r"'2'.*placeholders.*2\.bias"):
        di.load_state_dict(model, state)
    _assert_unchanged(model, before)


def test_torchs_load_state_dict_refuses_a_meta_value_and_leaves_the_layer_deferred() -> None:
    state: dict[str, Any] = _saved()
    state["2.bias"] = state["2.bias"].to("meta")
    model = _model("unbuilt")
    placeholders = list(model[2].parameters())
    with pytest.raises(RuntimeError, match=r"'2.bias' is a meta tensor"):
        model.load_state_dict(state)
    assert di.pending(model) == ["2"]
    assert all(p is q for p, q in zip(model[2].parameters(), placeholders, strict=True))


def test_torchs_load_state_dict_into_a_placeholder_draws_no_random_numbers() -> None:
    state = _saved()
    model = _model("unbuilt")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model.load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), before)
    _assert_loaded(model, state)


# --------------------------------------------------------------------------- strict


STRICT_CASES: dict[str, Callable[[StateDict], dict[str, Any]]] = {
    "missing": lambda s: {k: v for k, v in s.items() if not k.startswith("2.")},
    "unexpected": lambda s: {
        **s,
        "x": torch.zeros(1),
        "2.extra": torch.zeros(1),
        "1.w": s["2.bias"],
    },
    "both": lambda s: {("head." + k if k.startswith("0.") else k): v for k, v in s.items()},
    # A training checkpoint's other entries: torch reports them, whatever they hold.
    "not-tensors": lambda s: {**s, "epoch": 3, "optimizer": {"lr": 0.1}, "2.note": "x"},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_not_strict_returns_torchs_incompatible_keys(kind: str, case: str) -> None:
    state = STRICT_CASES[case](_saved())
    eager = _eager()
    want = eager.load_state_dict(state, strict=False)
    got = di.load_state_dict(_model(kind), state, strict=False)
    assert type(got) is type(want)
    assert got == want


@pytest.mark.parametrize("case", list(STRICT_CASES))
def test_strict_errors_list_every_offending_key(case: str) -> None:
    state = STRICT_CASES[case](_saved())
    want = _eager().load_state_dict(state, strict=False)
    model = _model("built")
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, state)
    for key in [*want.missing_keys, *want.unexpected_keys]:
        assert key in str(caught.value), key
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("source", ["dict", "safetensors", "torch"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("at", [1, 2, 4])
def test_an_interrupt_midway_through_loading_leaves_the_model_unchanged(
    kind: str, at: int, source: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Files take the other road: their tensors are swapped in, not copied.
    loaded: Any = _saved() if source == "dict" else FILES[source](tmp_path, _saved())
    model = _model(kind)
    before = _snapshot(model)
    calls = {"copy": 0, "swap": 0}
    real_copy, real_swap = torch.Tensor.copy_, torch._C._swap_tensor_impl

    def copy(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["copy"] += 1
        if calls["copy"] == at:
            raise KeyboardInterrupt
        return real_copy(self, *args, **kwargs)

    def swap(a: torch.Tensor, b: torch.Tensor) -> None:
        calls["swap"] += 1
        if calls["swap"] == at:
            raise KeyboardInterrupt
        real_swap(a, b)

    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    monkeypatch.setattr(torch._C, "_swap_tensor_impl", swap)  # what deferinit swaps with
    with pytest.raises(KeyboardInterrupt):
        di.load_state_dict(model, loaded)
    monkeypatch.undo()
    _assert_unchanged(model, before)
    state = _saved()
    di.load_state_dict(model, state)
    _assert_loaded(model, state)


# --------------------------------------------------------------------------- files


def _torch_file(tmp: Path, state: StateDict | None = None) -> Path:
    path = tmp / "model.pt"
    torch.save(state if state is not None else _saved(), path)
    return path


def _safetensors_file(tmp: Path, state: StateDict | None = None) -> Path:
    path = tmp / "model.safetensors"
    save_file(state if state is not None else _saved(), str(path))
    return path


FILES = {"torch": _torch_file, "safetensors": _safetensors_file}


def _refused(model: nn.Module, path: Path, *words: str) -> None:
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError) as caught:
        di.load_state_dict(model, path)
    message = str(caught.value)
    assert path.name in message, message
    for word in words:
        assert word in message, message
    _assert_unchanged(model, before)


@pytest.mark.parametrize("fmt", list(FILES))
@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_file_is_refused(fmt: str, kind: str, tmp_path: Path) -> None:
    path = FILES[fmt](tmp_path)
    path.write_bytes(b"")
    _refused(_model(kind), path, "empty")


@pytest.mark.parametrize("fmt", list(FILES))
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused(fmt: str, keep: float, tmp_path: Path) -> None:
    path = FILES[fmt](tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _refused(_model("unbuilt"), path, "cannot be read")


@pytest.mark.parametrize("where", [0.3, 0.6, 0.9])
def test_a_flipped_bit_in_a_torch_files_data_is_caught(where: float, tmp_path: Path) -> None:
    # torch's reader does not check the zip records' CRC-32: the flipped value would
    # load silently. deferinit checks them.
    state = {"0.weight": torch.randn(16, 20), "0.bias": torch.randn(16)}
    state |= {"2.weight": torch.randn(4, 16), "2.bias": torch.randn(4)}
    path = _torch_file(tmp_path, state)
    data = bytearray(path.read_bytes())
    start = data.find(state["0.weight"].numpy().tobytes()[:64])
    assert start > 0
    data[start + int(16 * 20 * 4 * where)] ^= 0x10
    path.write_bytes(bytes(data))
    _refused(_model("built"), path, "CRC-32")


def test_a_torch_file_saved_without_crcs_still_loads(tmp_path: Path) -> None:
    state = _saved()
    torch.serialization.set_crc32_options(False)
    try:
        path = _torch_file(tmp_path, state)
    finally:
        torch.serialization.set_crc32_options(True)
    model = _model("unbuilt")
    di.load_state_dict(model, path)
    _assert_loaded(model, state)


def test_a_safetensors_file_with_a_broken_header_is_refused(tmp_path: Path) -> None:
    path = _safetensors_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the JSON header now opens a list
    path.write_bytes(bytes(data))
    _refused(_model("meta-built"), path, "cannot be read as a safetensors file")


def test_a_torch_file_under_a_safetensors_name_loads_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    saved = _saved()
    torch.save(saved, path)  # a torch zip under a safetensors name: read as what it is
    model = _model("built")
    di.load_state_dict(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_a_missing_file_stays_file_not_found(tmp_path: Path) -> None:
    model = _model("built")
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        di.load_state_dict(model, tmp_path / "nothing.safetensors")
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- crafted pickles


class _Touch:
    """Unpickling this calls ``os.system('touch marker')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _PathTouch:
    """Unpickling this calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


PAYLOADS = {"os.system": _Touch, "Path.touch": _PathTouch}


def _save_crafted(path: Path, payload: Any, how: str) -> None:
    if how == "zip":
        torch.save({"0.weight": payload, "0.bias": torch.zeros(16)}, path)
    elif how == "legacy":
        torch.save({"0.weight": payload}, path, _use_new_zipfile_serialization=False)
    elif how == "whole-object":
        torch.save(payload, path)
    else:  # a plain pickle under a torch name
        path.write_bytes(pickle.dumps({"0.weight": payload}))


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("how", ["zip", "legacy", "whole-object", "raw-pickle"])
@pytest.mark.parametrize("kind", ["unbuilt", "built"])
def test_a_crafted_pickle_is_refused_and_never_runs(
    payload: str, how: str, kind: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _save_crafted(path, PAYLOADS[payload](marker), how)
    assert not marker.exists()
    _refused(_model(kind), path)
    assert not marker.exists(), "the checkpoint ran code"


# --------------------------------------------------------------------------- random corruption


def _torch_bytes(state: StateDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _safetensors_header_end(data: bytes) -> int:
    return 8 + int(struct.unpack("<Q", data[:8])[0])


_ORIGINAL = _saved(3)
_FILES = {"torch": _torch_bytes(_ORIGINAL), "safetensors": safetensors_bytes(_ORIGINAL)}


@st.composite
def _corruptions(draw: st.DrawFn) -> tuple[str, str, bytes]:
    fmt = draw(st.sampled_from(["torch", "safetensors"]))
    data = bytearray(_FILES[fmt])
    # safetensors carries no checksum: a flipped data byte loads the flipped value,
    # as it would with any reader, so only its header is corrupted here (the data
    # region is pinned by test_a_safetensors_data_byte_loads_what_the_file_says).
    end = len(data) if fmt == "torch" else _safetensors_header_end(bytes(data))
    how = draw(st.sampled_from(["flip", "truncate", "append", "zero-run"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, end - 1))] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        start = draw(st.integers(0, end - 1))
        data[start : start + draw(st.integers(1, 32))] = bytes(draw(st.integers(1, 32)))
    return fmt, how, bytes(data)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(corruption=_corruptions(), kind=st.sampled_from(KINDS))
def test_a_corrupt_file_loads_the_original_or_changes_nothing(
    corruption: tuple[str, str, bytes], kind: str, tmp_path: Path
) -> None:
    fmt, _, data = corruption
    path = tmp_path / f"corrupt.{'pt' if fmt == 'torch' else 'safetensors'}"
    path.write_bytes(data)
    model = _model(kind)
    before = _snapshot(model)
    try:
        di.load_state_dict(model, path)
    except (di.DeferredInitError, FileNotFoundError):
        _assert_unchanged(model, before)
    else:
        _assert_loaded(model, _ORIGINAL)


def test_a_safetensors_data_byte_loads_what_the_file_says(tmp_path: Path) -> None:
    data = bytearray(_FILES["safetensors"])
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(data))
    model = _model("unbuilt")
    di.load_state_dict(model, path)
    says = load_file(str(path))
    assert not torch.equal(says["2.weight"], _ORIGINAL["2.weight"])
    _assert_loaded(model, {k: says[k] for k in _ORIGINAL})


# --------------------------------------------------------------------------- files never aliased


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_loaded_from_a_safetensors_file_do_not_share_its_pages(
    kind: str, tmp_path: Path
) -> None:
    # safetensors.torch.load_file maps the file: a tensor it returns changes when the
    # file is written in place. The loaded model must not.
    state = _saved()
    path = _safetensors_file(tmp_path, state)
    model = _model(kind)
    di.load_state_dict(model, path)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(size // 2)
        file.write(b"\xff" * (size // 2))
    _assert_loaded(model, state)


def test_a_torch_files_ties_by_storage_become_two_tensors(tmp_path: Path) -> None:
    shared = torch.randn(6, 6)
    state = {
        "0.weight": shared,
        "0.bias": torch.zeros(6),
        "1.weight": shared,
        "1.bias": torch.ones(6),
    }
    path = _torch_file(tmp_path, state)
    model = nn.Sequential(dnn.Linear(6), dnn.Linear(6))
    di.load_state_dict(model, path)
    first, second = _weight(model, "0"), _weight(model, "1")
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    with torch.no_grad():
        first.add_(1.0)
    assert torch.equal(second, shared)


@pytest.mark.parametrize("fmt", list(FILES))
def test_a_built_parameter_viewed_elsewhere_is_loaded_in_place(fmt: str, tmp_path: Path) -> None:
    # A file's tensor may replace a parameter's storage only when nothing else uses
    # it; a view (a tie by storage, FSDP1's flat parameter) must see the new values.
    model = _model("built")
    view = _weight(model, "0").detach().view(-1)
    pointer = _weight(model, "0").data_ptr()
    state = _saved()
    di.load_state_dict(model, FILES[fmt](tmp_path, state))
    assert _weight(model, "0").data_ptr() == pointer
    assert torch.equal(view, state["0.weight"].view(-1))
    _assert_loaded(model, state)


@pytest.mark.parametrize("source", ["dict", "safetensors"])
def test_a_torch_lazy_module_beside_deferred_layers_takes_the_checkpoint(
    source: str, tmp_path: Path
) -> None:
    state = _saved()
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), dnn.Linear(4))
    weight = model.get_submodule("0").weight
    loaded: Any = state if source == "dict" else _safetensors_file(tmp_path, state)
    di.load_state_dict(model, loaded)
    assert model.get_submodule("0").weight is weight
    _assert_loaded(model, state)
    eager = _eager()
    eager.load_state_dict(state)
    x = torch.randn(3, 20)
    assert torch.equal(model(x), eager(x))


def test_a_torch_lazy_module_is_unchanged_after_a_refused_load() -> None:
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), dnn.Linear(4))
    before = _snapshot(model)
    with pytest.raises(di.DeferredInitError, match="missing keys: 2.bias"):
        di.load_state_dict(model, {k: v for k, v in _saved().items() if k != "2.bias"})
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- devices, extra state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_checkpoint_goes_to_the_models_device() -> None:
    # Built layers are copied into where they are; unbuilt layers declared (or moved)
    # to a device are built there; meta-built layers had no device: the checkpoint's.
    state = _saved()
    built = _deferred().cuda()
    built(torch.randn(2, 20, device="cuda"))
    unbuilt = _deferred().cuda()
    meta = _model("meta-built")
    for model in (built, unbuilt, meta):
        di.load_state_dict(model, state)
    assert {p.device.type for p in [*built.parameters(), *unbuilt.parameters()]} == {"cuda"}
    assert {p.device.type for p in meta.parameters()} == {"cpu"}
    for model in (built, unbuilt, meta):
        for key, value in model.state_dict().items():
            assert torch.equal(value.cpu(), state[key]), key


class _Counter(nn.Module):
    """A layer with extra state (get_extra_state/set_extra_state), beside its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.steps = 0

    def get_extra_state(self) -> Any:
        return {"steps": self.steps}

    def set_extra_state(self, state: Any) -> None:
        self.steps = state["steps"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_extra_state_loads_after_the_tensors_and_is_checked_as_a_key() -> None:
    source = nn.Sequential(_Counter(), dnn.Linear(3))
    source(torch.randn(1, 2))
    source[0].steps = 5  # type: ignore[assignment]
    state = source.state_dict()
    assert state["0._extra_state"] == {"steps": 5}
    model = nn.Sequential(_Counter(), dnn.Linear(3))
    di.load_state_dict(model, state)
    assert model[0].steps == 5
    assert torch.equal(model.state_dict()["1.weight"], state["1.weight"])
    refused = nn.Sequential(_Counter(), dnn.Linear(3))
    with pytest.raises(di.DeferredInitError, match="missing keys: 0._extra_state"):
        di.load_state_dict(refused, {k: v for k, v in state.items() if "extra" not in k})
    assert refused[0].steps == 0 and di.pending(refused) == ["1"]


class _Refusing(nn.Module):
    """A user's block whose constructor raises once ``refuse`` is set."""

    refuse = False

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim)
        if _Refusing.refuse:
            raise ValueError("constructor refuses")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out


def test_a_constructor_failing_while_sizes_are_read_off_a_checkpoint_names_the_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved = nn.Sequential(_Refusing(3, 8), _Refusing(8, 4)).state_dict()
    block = di.defer(_Refusing, in_dim=di.dim(-1))
    model = nn.Sequential(block(out_dim=8), block(out_dim=4))
    monkeypatch.setattr(_Refusing, "refuse", True)
    with pytest.raises(di.InferenceError, match=r"layer '0'.*ValueError: constructor refuses.*Fix"):
        di.load_state_dict(model, saved)
    assert di.pending(model) == ["0", "1"]
    monkeypatch.setattr(_Refusing, "refuse", False)
    di.load_state_dict(model, saved)
    assert torch.equal(model.get_parameter("1.lin.weight"), saved["1.lin.weight"])
