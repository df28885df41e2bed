"""Regression tests for ``di.adopt`` and unbuilt state dicts between torch's Lazy
batch norms and deferinit's twins.

- An adopted Lazy norm declared on a device (``meta``, ``cuda``) builds there, its
  ``num_batches_tracked`` included, as torch's own Lazy module keeps it.
- Attributes and submodules a user added to a Lazy module survive ``di.adopt``;
  what cannot be carried (an extra parameter or buffer, an instance attribute that
  overrides a method) is refused before anything changes.
- A state dict that torch's Lazy batch norm saves before its first forward (its
  ``num_batches_tracked`` is a real ``tensor(0)``, every other tensor a
  placeholder) loads into an unbuilt twin and leaves it deferred, by torch's
  ``load_state_dict`` and by ``di.load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import deferinit as di
from deferinit import nn as dnn

LazyNorm = Callable[..., nn.Module]

# Every Lazy norm that holds num_batches_tracked, with an input of its rank.
NORMS: list[tuple[LazyNorm, dict[str, bool], tuple[int, ...]]] = [
    (nn.LazyBatchNorm1d, {}, (4, 3)),
    (nn.LazyBatchNorm2d, {}, (2, 3, 5, 5)),
    (nn.LazyBatchNorm3d, {}, (2, 3, 4, 4, 4)),
    (nn.LazyInstanceNorm1d, {"track_running_stats": True}, (2, 3, 5)),
    (nn.LazyInstanceNorm2d, {"track_running_stats": True, "affine": True}, (2, 3, 5, 5)),
    (nn.LazyInstanceNorm3d, {"track_running_stats": True}, (2, 3, 4, 4, 4)),
]
NORM_IDS = [f"{cls.__name__}" for cls, _, _ in NORMS]


def _eager(cls: LazyNorm, kwargs: dict[str, bool], channels: int) -> nn.Module:
    """The eager norm that ``cls(**kwargs)`` builds (torch's Lazy instance norms
    default to ``affine=True, track_running_stats=True``, unlike the eager ones)."""
    lazy = cls(**kwargs)
    flags = {k: getattr(lazy, k) for k in ("affine", "track_running_stats")}
    name = cls.__name__.removeprefix("Lazy")
    return getattr(nn, name)(channels, **flags)  # type: ignore[no-any-return]


# -- bug 1: the count on the Lazy module's device -------------------------------------


@pytest.mark.parametrize(("cls", "kwargs", "shape"), NORMS, ids=NORM_IDS)
def test_an_adopted_meta_lazy_norm_builds_on_meta_from_a_shape(
    cls: LazyNorm, kwargs: dict[str, bool], shape: tuple[int, ...]
) -> None:
    layer = di.adopt(cls(device="meta", **kwargs))
    di.build(layer, shape)
    assert type(layer) is type(_eager(cls, kwargs, 3))
    tensors = dict([*layer.named_parameters(), *layer.named_buffers()])
    assert "num_batches_tracked" in tensors
    assert all(t.device.type == "meta" for t in tensors.values()), tensors
    assert tensors["num_batches_tracked"].dtype == torch.long


@pytest.mark.parametrize(("cls", "kwargs", "shape"), NORMS, ids=NORM_IDS)
def test_an_adopted_meta_lazy_norm_builds_on_meta_with_device_meta(
    cls: LazyNorm, kwargs: dict[str, bool], shape: tuple[int, ...]
) -> None:
    layer = di.adopt(cls(device="meta", **kwargs))
    di.build(layer, shape, device="meta")
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    di.materialize(layer)
    eager = _eager(cls, kwargs, 3)
    assert layer.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


@pytest.mark.parametrize(("cls", "kwargs", "shape"), NORMS, ids=NORM_IDS)
def test_an_adopted_meta_lazy_norm_runs_a_first_forward_on_meta_like_torchs(
    cls: LazyNorm, kwargs: dict[str, bool], shape: tuple[int, ...]
) -> None:
    theirs = cls(device="meta", **kwargs)
    ours = di.adopt(cls(device="meta", **kwargs))
    x = torch.empty(shape, device="meta")
    got, want = ours(x), theirs(x)
    assert type(ours) is type(theirs)
    assert got.device == want.device and got.shape == want.shape
    assert {n: (t.device, t.dtype, t.shape) for n, t in ours.state_dict().items()} == {
        n: (t.device, t.dtype, t.shape) for n, t in theirs.state_dict().items()
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("cls", "kwargs", "shape"), NORMS, ids=NORM_IDS)
def test_an_adopted_cuda_lazy_norm_keeps_every_tensor_on_cuda(
    cls: LazyNorm, kwargs: dict[str, bool], shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, device="cuda")
    theirs = cls(device="cuda", **kwargs)
    theirs(x)
    for build in ("forward", "di.build"):
        ours = di.adopt(cls(device="cuda", **kwargs))
        if build == "forward":
            ours(x)
        else:
            di.build(ours, x)
        devices = {n: t.device for n, t in ours.state_dict().items()}
        assert devices == {n: t.device for n, t in theirs.state_dict().items()}, build


def test_the_count_a_lazy_norm_held_before_adoption_is_zero_after_the_build_as_torchs() -> None:
    # torch's Lazy norm zeroes its count at its first forward (reset_running_stats).
    theirs, lazy = nn.LazyBatchNorm1d(), nn.LazyBatchNorm1d()
    for m in (theirs, lazy):
        m.get_buffer("num_batches_tracked").fill_(7)
        m.eval()
    ours = di.adopt(lazy)
    x = torch.randn(4, 3)
    theirs(x)
    ours(x)
    assert int(ours.get_buffer("num_batches_tracked")) == 0
    assert int(theirs.get_buffer("num_batches_tracked")) == 0


# -- bug 3: what a user added to a Lazy module ------------------------------------------


def test_adopt_keeps_attributes_and_submodules_a_user_added() -> None:
    lazy = nn.LazyLinear(3)
    extra = nn.ReLU()
    setattr(lazy, "tag", "mine")  # noqa: B010 (mypy: Module's __setattr__ types)
    lazy.extra = extra
    net = nn.Sequential(lazy)
    di.adopt(net)
    assert isinstance(lazy, dnn.Linear)
    assert lazy.__dict__["tag"] == "mine"
    assert lazy._modules["extra"] is extra
    assert lazy.get_submodule("extra") is extra
    assert [name for name, _ in net.named_modules()] == ["", "0", "0.extra"]


def test_what_a_user_added_to_a_lazy_module_survives_the_build_after_adopt() -> None:
    lazy = nn.LazyLinear(3)
    extra = nn.ReLU()
    setattr(lazy, "tag", "mine")  # noqa: B010 (mypy: Module's __setattr__ types)
    lazy.extra = extra
    di.adopt(lazy)
    lazy(torch.randn(2, 4))
    assert type(lazy) is nn.Linear
    assert lazy.__dict__.get("tag") == "mine"
    assert lazy._modules.get("extra") is extra


def test_adopt_keeps_a_lazy_submodule_a_user_added_and_adopts_it_too() -> None:
    lazy = nn.LazyLinear(3)
    inner = nn.LazyLinear(2)
    lazy.inner = inner
    di.adopt(lazy)
    assert isinstance(lazy, dnn.Linear) and isinstance(inner, dnn.Linear)
    assert lazy._modules["inner"] is inner


@pytest.mark.parametrize(
    ("add", "named"),
    [
        (lambda m: m.register_parameter("scale", nn.Parameter(torch.ones(3))), "'scale'"),
        (lambda m: m.register_buffer("mask", torch.ones(3)), "'mask'"),
        (lambda m: m.register_buffer("cache", torch.ones(3), persistent=False), "'cache'"),
        (lambda m: setattr(m, "forward", lambda x: x), "'forward'"),
    ],
    ids=["parameter", "buffer", "non-persistent-buffer", "forward-override"],
)
def test_adopt_refuses_what_it_cannot_carry_and_changes_nothing(
    add: Callable[[nn.Module], None], named: str
) -> None:
    first, lazy = nn.LazyLinear(4), nn.LazyLinear(3)
    add(lazy)
    net = nn.Sequential(first, lazy)
    before = {id(m): (type(m), dict(m.__dict__)) for m in net.modules()}
    tensors = [*net.parameters(), *net.buffers()]
    with pytest.raises(di.DeferredInitError, match=rf"'1'.*{named}.*Nothing was changed"):
        di.adopt(net)
    for m in net.modules():
        cls, saved = before[id(m)]
        assert type(m) is cls
        assert m.__dict__ == saved
    assert all(a is b for a, b in zip([*net.parameters(), *net.buffers()], tensors, strict=True))


# -- bug 4: unbuilt batch-norm state dicts between torch's Lazy and deferinit ----------


def _lazy_norms() -> nn.Sequential:
    return nn.Sequential(
        nn.LazyLinear(4),
        nn.LazyBatchNorm1d(),
        nn.LazyInstanceNorm1d(track_running_stats=True, affine=True),
    )


def _twins() -> nn.Sequential:
    return nn.Sequential(
        dnn.Linear(4),
        dnn.BatchNorm1d(),
        dnn.InstanceNorm1d(track_running_stats=True, affine=True),
    )


def _eager_norms() -> nn.Sequential:
    """The models above with every size written out, for inputs of shape (N, 3, 5)."""
    return nn.Sequential(
        nn.Linear(5, 4),
        nn.BatchNorm1d(3),
        nn.InstanceNorm1d(3, track_running_stats=True, affine=True),
    )


@pytest.mark.parametrize("route", ["torch", "di"])
@pytest.mark.parametrize("model", ["adopted", "twins"])
def test_torchs_unbuilt_lazy_norm_state_dict_leaves_a_deferinit_model_deferred(
    route: str, model: str
) -> None:
    saved = _lazy_norms().state_dict()
    assert not is_lazy(saved["1.num_batches_tracked"])  # torch's count is real
    net = di.adopt(_lazy_norms()) if model == "adopted" else _twins()
    placeholders = [*net.parameters(), *net.buffers()]
    if route == "torch":
        result = net.load_state_dict(saved)
    else:
        result = di.load_state_dict(net, saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert di.pending(net) == ["0", "1", "2"]
    assert all(
        a is b for a, b in zip([*net.parameters(), *net.buffers()], placeholders, strict=True)
    )
    x = torch.randn(2, 3, 5)
    torch.manual_seed(0)
    di.build(net, x)
    torch.manual_seed(0)
    eager = _eager_norms()
    for key, value in eager.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


@pytest.mark.parametrize("route", ["torch", "di"])
def test_an_unbuilt_norm_state_dict_with_a_count_and_real_sizes_still_refuses_a_mix(
    route: str,
) -> None:
    # The count does not decide; a real weight beside placeholders still is a mix.
    saved = _lazy_norms().state_dict()
    saved["1.weight"] = torch.ones(3)
    net = _twins()
    if route == "torch":
        with pytest.raises(RuntimeError, match=r"placeholders .* for bias, running_mean"):
            net.load_state_dict(saved)
    else:
        with pytest.raises(di.DeferredInitError, match=r"placeholders .* for 1\.bias"):
            di.load_state_dict(net, saved)
    assert di.pending(net) == ["0", "1", "2"]


@pytest.mark.parametrize("route", ["torch", "di"])
def test_a_count_alone_in_a_state_dict_leaves_the_norm_deferred_with_missing_keys(
    route: str,
) -> None:
    saved = {"num_batches_tracked": torch.tensor(0)}
    layer = dnn.BatchNorm1d()
    loaded = (
        layer.load_state_dict(saved, strict=False)
        if route == "torch"
        else di.load_state_dict(layer, saved, strict=False)
    )
    assert sorted(loaded.missing_keys) == ["bias", "running_mean", "running_var", "weight"]
    assert di.pending(layer) == [""]


@pytest.mark.xfail(
    strict=True,
    raises=di.NotBuiltError,
    reason="before its build a twin's num_batches_tracked is a placeholder (docs/design.md "
    "§3.1), whose shape and value torch's Lazy norm reads when it loads: this needs the "
    "twin's count real from its declaration, as torch's Lazy norm holds it",
)
def test_an_unbuilt_twin_norm_state_dict_loads_into_torchs_lazy_norm() -> None:
    theirs = nn.Sequential(nn.LazyBatchNorm1d())
    theirs.load_state_dict(nn.Sequential(dnn.BatchNorm1d()).state_dict())
    assert type(theirs[0]) is nn.LazyBatchNorm1d


def test_an_adopted_lazy_module_with_a_child_loads_a_state_dict_by_torch() -> None:
    def model() -> nn.Sequential:
        lazy = nn.LazyLinear(3)
        lazy.extra = nn.Linear(2, 2)
        return nn.Sequential(lazy)

    saved = di.adopt(model()).state_dict()
    saved["0.extra.weight"] = torch.full((2, 2), 5.0)
    net = di.adopt(model())
    result = net.load_state_dict(saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert di.pending(net) == ["0"]
    assert torch.equal(net.get_parameter("0.extra.weight"), saved["0.extra.weight"])


def test_a_count_saved_as_a_one_element_vector_loads_into_an_unbuilt_norm_by_torch() -> None:
    # torch's loader takes a (1,) tensor for a scalar (checkpoints of torch 0.3).
    saved = nn.BatchNorm1d(3).state_dict()
    saved["num_batches_tracked"] = torch.tensor([5])
    layer = dnn.BatchNorm1d()
    layer.load_state_dict(saved)
    assert int(layer.get_buffer("num_batches_tracked")) == 5
