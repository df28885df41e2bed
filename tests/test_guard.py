"""The guard of a built layer (its ``forward`` attribute) against eager torch's bound
``forward``: the same ``TypeError`` text for wrong arguments, the same signature,
alive after the layer's other references are dropped, freed at once otherwise,
scriptable by ``torch.jit.script``, and bounded caches in a long-running process.
"""

from __future__ import annotations

import copy
import gc
import inspect
import pickle
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._become import _guard
from deferinit._declare import _signature


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Freed means freed by reference counting, as eager models are."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _built_linear() -> tuple[nn.Module, nn.Module]:
    layer = dnn.Linear(3)
    layer(torch.randn(2, 4))
    eager = nn.Linear(4, 3)
    return layer, eager


def _type_error(call: Callable[[], Any]) -> str:
    with pytest.raises(TypeError) as info:
        call()
    return str(info.value)


WRONG_CALLS: list[tuple[str, Callable[[nn.Module], Any]]] = [
    ("no-arguments", lambda m: m()),
    ("three-arguments", lambda m: m(1, 2, 3)),
    ("unknown-keyword", lambda m: m(foo=1)),
    ("twice", lambda m: m(torch.randn(2, 4), input=torch.randn(2, 4))),
    ("forward-directly", lambda m: m.forward()),
]


@pytest.mark.parametrize(("wrong"), [w for _, w in WRONG_CALLS], ids=[i for i, _ in WRONG_CALLS])
def test_wrong_arguments_to_a_built_layer_raise_eagers_type_error(
    wrong: Callable[[nn.Module], Any],
) -> None:
    layer, eager = _built_linear()
    assert _type_error(lambda: wrong(layer)) == _type_error(lambda: wrong(eager))


def test_wrong_arguments_name_forward_of_the_class_that_defines_it() -> None:
    # BatchNorm2d's forward is _BatchNorm.forward; MultiheadAttention's takes many arguments.
    for twin, eager, x in [
        (dnn.BatchNorm2d(), nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4)),
        (dnn.MultiheadAttention(num_heads=2), nn.MultiheadAttention(8, 2), torch.randn(5, 2, 8)),
    ]:
        twin(*(x,) * (3 if isinstance(eager, nn.MultiheadAttention) else 1))
        assert _wrong_call(twin) == _wrong_call(eager)
        assert _wrong_call(twin, x, bogus=1) == _wrong_call(eager, x, bogus=1)


def _wrong_call(layer: nn.Module, *args: Any, **kwargs: Any) -> str:
    return _type_error(lambda: layer(*args, **kwargs))


def test_signature_of_a_built_forward_equals_eagers() -> None:
    layer, eager = _built_linear()
    assert inspect.signature(layer.forward) == inspect.signature(eager.forward)
    assert isinstance(layer.forward, type(eager.forward))
    forward: Any = layer.forward
    for name in ("__doc__", "__module__", "__name__", "__qualname__"):
        assert getattr(forward, name) == getattr(eager.forward, name), name
    assert forward.__func__ is nn.Linear.forward
    assert forward.__self__ is layer


def test_bound_forward_works_after_the_layer_is_dropped(no_gc: None) -> None:
    layer, _ = _built_linear()
    x = torch.randn(5, 4)
    want = layer(x).detach()  # an autograd graph would hold the weight
    forward = layer.forward
    weight = weakref.ref(layer.weight)
    del layer
    with torch.no_grad():
        assert torch.equal(forward(x), want)
        assert weight() is not None
        assert torch.equal(pickle.loads(pickle.dumps(forward))(x), want)
    del forward
    assert weight() is None  # the kept state is freed with the forward, no cycle


@pytest.mark.parametrize(
    "copy_of",
    [copy.deepcopy, lambda f: pickle.loads(pickle.dumps(f))],
    ids=["deepcopy", "pickle"],
)
def test_a_copied_bound_forward_works_as_eagers_does(
    copy_of: Callable[[Any], Any], no_gc: None
) -> None:
    layer, _ = _built_linear()
    x = torch.randn(5, 4)
    with torch.no_grad():
        copied = copy_of(layer.forward)
        assert torch.equal(copied(x), layer(x))
        assert copied.__self__ is not layer
    with pytest.raises(di.ShapeMismatchError, match=r"^Linear layer was built for in_features=4"):
        copied(torch.randn(5, 6))


def test_bound_forward_of_a_layer_freed_in_a_cycle_says_what_happened() -> None:
    layer, _ = _built_linear()
    layer.__dict__["cycle"] = [layer]  # only the garbage collector frees it
    forward = layer.forward
    del layer
    gc.collect()
    with pytest.raises(
        di.DeferredInitError,
        match=r"^the Linear layer of this forward no longer exists: the garbage collector "
        r"freed it as part of a reference cycle.* Fix: keep a reference to the layer",
    ):
        forward(torch.randn(5, 4))


def test_bound_forward_kept_after_the_layer_still_reports_a_mismatch() -> None:
    layer, _ = _built_linear()
    forward = layer.forward
    del layer
    with pytest.raises(di.ShapeMismatchError, match=r"^Linear layer was built for in_features=4"):
        forward(torch.randn(5, 6))


def test_bound_forward_of_an_inner_layer_outlives_its_model(no_gc: None) -> None:
    model = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    x = torch.randn(3, 5)
    model(x)
    hidden = model[1](model[0](x))
    forward = model[0].forward
    del model
    assert torch.equal(torch.relu(forward(x)), hidden)


def test_dropped_built_model_is_freed_without_the_garbage_collector(no_gc: None) -> None:
    model = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    model(torch.randn(3, 5))
    refs = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(model[0])]
    del model
    assert all(r() is None for r in refs)


def _tracked_after(make: Callable[[], nn.Sequential], x: torch.Tensor) -> tuple[int, nn.Sequential]:
    """Objects the garbage collector tracks for ``make()`` after its first forward."""
    gc.collect()
    before = len(gc.get_objects())
    model = make()
    model(x)
    gc.collect()
    return len(gc.get_objects()) - before, model


def test_a_built_layer_leaves_few_objects_for_the_garbage_collector() -> None:
    # Every tracked object is walked by each full collection: in a 10,000-layer
    # build those passes are what grows faster than the layer count (build_scaling.py).
    n, x = 200, torch.randn(2, 16)
    _tracked_after(lambda: nn.Sequential(dnn.Linear(16)), x)  # class-level caches filled
    deferred, kept = _tracked_after(lambda: nn.Sequential(*(dnn.Linear(16) for _ in range(n))), x)
    eager, kept_too = _tracked_after(
        lambda: nn.Sequential(*(nn.Linear(16, 16) for _ in range(n))), x
    )
    # A built layer's own: its state and its dict, the guard, the guard's two weak
    # references, the input's description. Key sets are shared between layers.
    assert (deferred - eager) / n <= 6.5
    assert kept[0].__dict__["_di"].built_keys is kept[1].__dict__["_di"].built_keys


def _mlp() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    x = torch.randn(4, 20)
    torch.manual_seed(0)
    deferred = nn.Sequential(dnn.Linear(32), nn.ReLU(), dnn.Linear(10))
    deferred(x)
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
    return deferred, eager, x


def _conv_net() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    x = torch.randn(2, 3, 12, 12)

    def net(conv: Any, norm: Any, linear: Any, first: bool) -> nn.Module:
        return nn.Sequential(
            conv(4, kernel_size=3) if first else conv(3, 4, kernel_size=3),
            norm() if first else norm(4),
            nn.ReLU(),
            nn.Flatten(),
            linear(5) if first else linear(400, 5),
        ).eval()

    torch.manual_seed(0)
    deferred = net(dnn.Conv2d, dnn.BatchNorm2d, dnn.Linear, first=True)
    deferred(x)
    torch.manual_seed(0)
    eager = net(nn.Conv2d, nn.BatchNorm2d, nn.Linear, first=False)
    return deferred, eager, x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # 2.14: FutureWarning
@pytest.mark.parametrize("make", [_mlp, _conv_net], ids=["mlp", "conv-net"])
def test_jit_script_of_a_built_model_equals_eagers(
    make: Callable[[], tuple[nn.Module, nn.Module, torch.Tensor]],
) -> None:
    deferred, eager, x = make()
    scripted, scripted_eager = torch.jit.script(deferred), torch.jit.script(eager)
    assert scripted.code == scripted_eager.code
    eager_modules = dict(scripted_eager.named_modules())
    for name, sub in scripted.named_modules():
        assert sub.code == eager_modules[name].code, name
    assert {k: v.shape for k, v in scripted.state_dict().items()} == {
        k: v.shape for k, v in scripted_eager.state_dict().items()
    }
    assert torch.equal(scripted(x), scripted_eager(x))
    assert torch.equal(scripted(x), eager(x))
    # The model itself is untouched: still guarded.
    with pytest.raises(di.ShapeMismatchError):
        deferred(x[:, :2] if x.dim() == 2 else x[:, :2])


def _fresh_linear_class(i: int) -> type[nn.Module]:
    return type(f"Linear{i}", (nn.Linear,), {})


def test_caches_keyed_by_class_stay_bounded() -> None:
    _guard._kind.cache_clear()
    _signature._forward_signature.cache_clear()
    _signature.fast_signature.cache_clear()
    x = torch.randn(1, 2)
    for i in range(600):
        layer = di.defer(_fresh_linear_class(i), in_features=di.dim(-1))(out_features=1)
        layer(x)
    for cache in (_guard._kind, _signature._forward_signature, _signature.fast_signature):
        info = cache.cache_info()
        assert info.maxsize is not None and info.currsize <= info.maxsize <= 256, cache


def test_an_evicted_guard_class_still_guards() -> None:
    layer, _ = _built_linear()
    _guard._kind.cache_clear()
    again, _ = _built_linear()
    with pytest.raises(di.ShapeMismatchError, match="in_features=4"):
        layer(torch.randn(2, 5))
    with pytest.raises(di.ShapeMismatchError, match="in_features=4"):
        again(torch.randn(2, 5))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # 2.14: FutureWarning
def test_jit_script_of_a_built_lstm_compiles_the_same_overloads_as_eagers() -> None:
    layer, eager = dnn.LSTM(4), nn.LSTM(3, 4)
    layer(torch.randn(5, 2, 3))
    scripted, scripted_eager = torch.jit.script(layer), torch.jit.script(eager)
    assert sorted(scripted._c._method_names()) == sorted(scripted_eager._c._method_names())
    assert scripted.forward__0.code == scripted_eager.forward__0.code
