"""di.load_state_dict runs a model's own load hooks and ``_load_from_state_dict``
overrides, as torch's ``load_state_dict`` does, on a built model; on a model not
fully built it refuses them by name rather than skipping them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


class Renamed(nn.Module):
    """A checkpoint of an older version stored ``lin.weight`` as ``old_w``."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, sd: Any, prefix: str, *args: Any) -> None:
        if prefix + "old_w" in sd:
            sd[prefix + "lin.weight"] = sd.pop(prefix + "old_w")
        super()._load_from_state_dict(sd, prefix, *args)


def _t(value: object) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


def _saved() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    src = nn.Linear(4, 3)
    return {"old_w": src.weight.detach().clone(), "lin.bias": src.bias.detach().clone()}


def _built() -> Renamed:
    torch.manual_seed(1)
    return di.build(Renamed(dnn.Linear(3)), (2, 4))


def test_override_runs_on_a_built_model_as_torch() -> None:
    sd = _saved()
    torch.manual_seed(1)
    eager = Renamed(nn.Linear(4, 3))
    expected = eager.load_state_dict(dict(sd))
    model = _built()
    weight = _t(model.lin.weight)
    got = di.load_state_dict(model, sd)
    assert got == expected
    assert _t(model.lin.weight) is weight  # the same object, copied into
    assert torch.equal(_t(model.lin.weight), _t(eager.lin.weight))
    assert torch.equal(_t(model.lin.bias), _t(eager.lin.bias))
    assert set(sd) == {"old_w", "lin.bias"}  # the caller's dict is not changed
    assert _t(model.lin.weight).data_ptr() != sd["old_w"].data_ptr()  # copied, not aliased


def test_module_pre_and_post_hooks_run_once() -> None:
    sd = _saved()
    sd["lin.weight"] = sd.pop("old_w")
    calls: list[str] = []

    def pre(module: nn.Module, state: Any, prefix: str, *args: Any) -> None:
        calls.append("pre")
        state[prefix + "weight"] = state.pop(prefix + "w")

    def private_pre(state: Any, prefix: str, *args: Any) -> None:
        calls.append("private")

    def post(module: nn.Module, keys: Any) -> None:
        calls.append("post")

    model = di.build(nn.Sequential(dnn.Linear(3)), (2, 4))
    model[0].register_load_state_dict_pre_hook(pre)
    model[0]._register_load_state_dict_pre_hook(private_pre)
    model[0].register_load_state_dict_post_hook(post)
    got = di.load_state_dict(model, {"0.w": sd["lin.weight"], "0.bias": sd["lin.bias"]})
    assert list(got.missing_keys) == [] and list(got.unexpected_keys) == []
    assert calls == ["pre", "private", "post"]
    assert torch.equal(_t(model[0].weight), sd["lin.weight"])
    assert torch.equal(_t(model[0].bias), sd["lin.bias"])


def test_post_hook_clearing_missing_keys_passes_strict() -> None:
    sd = _saved()
    model = di.build(nn.Sequential(dnn.Linear(3)), (2, 4))

    def post(module: nn.Module, keys: Any) -> None:
        keys.missing_keys.clear()

    model.register_load_state_dict_post_hook(post)
    got = di.load_state_dict(model, {"0.bias": sd["lin.bias"]})
    assert list(got.missing_keys) == []
    assert torch.equal(_t(model[0].bias), sd["lin.bias"])


def test_missing_key_after_the_override_is_named_and_nothing_loaded() -> None:
    model = _built()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(di.DeferredInitError, match=r"missing keys: lin\.weight.*Nothing was"):
        di.load_state_dict(model, {"lin.bias": torch.zeros(3)})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_size_mismatch_names_layer_and_key() -> None:
    model = _built()
    sd = {"old_w": torch.zeros(3, 5), "lin.bias": torch.ones(3)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        di.DeferredInitError, match=r"lin\.weight \(Linear layer 'lin'\): checkpoint \(3, 5\)"
    ):
        di.load_state_dict(model, sd)
    for k, v in model.state_dict().items():  # the bias copied before is put back
        assert torch.equal(v, before[k])


def test_failing_post_hook_leaves_the_model_as_it_was() -> None:
    model = _built()
    weight = _t(model.lin.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def post(module: nn.Module, keys: Any) -> None:
        raise ValueError("refused by the hook")

    model.register_load_state_dict_post_hook(post)
    with pytest.raises(ValueError, match="refused by the hook"):
        di.load_state_dict(model, _saved())
    assert _t(model.lin.weight) is weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_assign_keeps_parameter_objects() -> None:
    sd = _saved()
    model = _built()
    weight = _t(model.lin.weight)
    di.load_state_dict(model, sd, assign=True)
    assert _t(model.lin.weight) is weight
    assert isinstance(_t(model.lin.weight), nn.Parameter) and _t(model.lin.weight).requires_grad
    assert _t(model.lin.weight).data_ptr() == sd["old_w"].data_ptr()  # assign takes them


def test_override_below_a_deferred_model_is_refused_by_name() -> None:
    model = Renamed(dnn.Linear(3))
    with pytest.raises(di.DeferredInitError, match=r"Renamed.*_load_from_state_dict.*di\.build"):
        di.load_state_dict(model, _saved())
    assert di.pending(model)


def test_hook_on_a_model_not_built_is_refused_by_name() -> None:
    model = nn.Sequential(dnn.Linear(3))
    model[0].register_load_state_dict_pre_hook(lambda *a: None)
    sd = _saved()
    with pytest.raises(di.DeferredInitError, match=r"load hook.*di\.build"):
        di.load_state_dict(model, {"0.weight": sd["old_w"], "0.bias": sd["lin.bias"]})
    assert di.pending(model)


def test_torch_lazy_module_still_loads() -> None:
    sd = _saved()
    model = nn.Sequential(nn.LazyLinear(3))
    di.load_state_dict(model, {"0.weight": sd["old_w"], "0.bias": sd["lin.bias"]})
    assert torch.equal(_t(model[0].weight), sd["old_w"])
