"""The first call is all or nothing (docs/design.md §3.5, §3.10), for every exception and for
``BaseException`` (Ctrl-C, ``SystemExit``) too: an interrupted initializer, forward,
constructor or hook leaves the layer deferred with the same placeholders, and the
interrupt goes on unchanged. An initializer's own error is the same
``InferenceError`` from the first forward, ``di.build`` and ``di.materialize``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn


def placeholders(module: nn.Module) -> list[int]:
    return [id(t) for t in [*module.parameters(), *module.buffers()]]


def assert_untouched(layer: nn.Module, objects: list[int]) -> None:
    assert isinstance(layer, di.Deferred)
    assert placeholders(layer) == objects
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in layer.parameters())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_in_an_initializer_at_the_first_forward_leaves_the_layer_deferred(
    interrupt: type[BaseException],
) -> None:
    layer = dnn.Linear(4)
    raised = interrupt()
    calls: list[int] = []

    def init(module: nn.Module) -> None:
        calls.append(1)
        nn.init.ones_(module.get_parameter("weight"))  # half-initialized when interrupted
        if len(calls) == 1:
            raise raised

    di.initialize(layer, init)
    objects = placeholders(layer)
    with pytest.raises(interrupt) as caught:
        layer(torch.randn(2, 3))
    assert caught.value is raised  # the very exception, not wrapped
    assert_untouched(layer, objects)
    layer(torch.randn(2, 3))  # the next call builds and initializes
    assert torch.equal(layer.weight, torch.ones(4, 3))


@pytest.mark.parametrize("build", ["di.build", "di.build on meta + di.materialize"])
def test_interrupt_in_an_initializer_in_di_build_or_materialize_changes_nothing(
    build: str,
) -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module.out_features == 2:
            raise KeyboardInterrupt

    di.initialize(net, init)
    if build == "di.build":
        objects = placeholders(net)
        with pytest.raises(KeyboardInterrupt):
            di.build(net, (2, 3))
        assert di.pending(net) == ["0", "2"] and placeholders(net) == objects
    else:
        di.build(net, (2, 3), device="meta")
        with pytest.raises(KeyboardInterrupt):
            di.materialize(net)
        assert all(p.is_meta for p in net.parameters())


class Interrupting(nn.Module):
    """A user block whose forward is interrupted on its first run."""

    runs = 0

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).runs += 1
        if type(self).runs == 1:
            raise KeyboardInterrupt
        return self.proj(x)  # type: ignore[no-any-return]


def test_interrupt_in_the_first_forward_of_a_deferred_block_leaves_it_deferred() -> None:
    Interrupting.runs = 0
    block = di.defer(Interrupting, in_dim=di.dim(-1))()
    objects = placeholders(block)
    with pytest.raises(KeyboardInterrupt):
        block(torch.randn(2, 5))
    assert_untouched(block, objects)
    assert block(torch.randn(2, 5)).shape == (2, 2)


class InterruptedConstructor(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        if not torch.empty(0).is_meta:  # the layout probe on meta gets through
            raise KeyboardInterrupt


def test_interrupt_in_the_constructor_propagates_unchanged_and_changes_nothing() -> None:
    layer = di.defer(InterruptedConstructor, in_dim=di.dim(-1))()
    objects = placeholders(layer)
    with pytest.raises(KeyboardInterrupt):
        layer(torch.randn(2, 5))
    assert isinstance(layer, di.Deferred) and placeholders(layer) == objects


# --- hooks on the first call ---------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("hook says no"), KeyboardInterrupt()])
def test_a_forward_hook_failing_at_the_first_call_leaves_the_layer_deferred(
    error: BaseException,
) -> None:
    layer = dnn.Linear(4)
    runs: list[int] = []

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise error

    layer.register_forward_hook(hook)
    objects = placeholders(layer)
    with pytest.raises(type(error)) as caught:
        layer(torch.randn(2, 3))
    assert caught.value is error
    assert_untouched(layer, objects)
    layer(torch.randn(2, 3))
    layer(torch.randn(2, 3))
    assert isinstance(layer, nn.Linear) and not isinstance(layer, di.Deferred)
    assert len(runs) == 3  # each call runs the hook once


def test_a_forward_pre_hook_failing_at_the_first_call_leaves_the_layer_deferred() -> None:
    layer = dnn.Linear(4)

    def pre_hook(module: nn.Module, args: Any) -> None:
        raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(pre_hook)
    objects = placeholders(layer)
    with pytest.raises(KeyboardInterrupt):
        layer(torch.randn(2, 3))
    assert_untouched(layer, objects)
    handle.remove()
    assert layer(torch.randn(2, 3)).shape == (2, 4)


def test_forward_hooks_at_the_first_call_run_in_order_with_kwargs_and_replace_output() -> None:
    layer = dnn.Linear(4)
    seen: list[str] = []

    def first(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        seen.append("first")
        return output * 0

    def second(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> torch.Tensor:
        seen.append(f"second {sorted(kwargs)}")
        return output + 1

    layer.register_forward_hook(first)
    layer.register_forward_hook(second, with_kwargs=True)
    out = layer(torch.randn(2, 3))
    assert torch.equal(out, torch.ones(2, 4))
    assert seen == ["first", "second []"]
    assert len(layer._forward_hooks) == 2
    assert layer._forward_hooks is layer.__dict__["_forward_hooks"]
    assert list(layer._forward_hooks.values()) == [first, second]  # the layer's own table


# --- an initializer's own error --------------------------------------------------------


class InitFailedError(Exception):
    pass


def failing_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear) and module.out_features == 2:
        raise InitFailedError("no such init")


@pytest.mark.parametrize("path", ["first forward", "di.build", "di.materialize"])
def test_an_initializers_error_is_the_same_inference_error_on_every_path(path: str) -> None:
    net = nn.Sequential(dnn.Linear(4), nn.ReLU(), dnn.Linear(2))
    di.initialize(net, failing_init)
    if path == "di.materialize":
        di.build(net, (2, 3), device="meta")
    with pytest.raises(
        di.InferenceError,
        match=r"(?s)Linear layer '2': the initializer .*failing_init.* registered with "
        r"di.initialize raised InitFailedError: no such init\..*Fix:",
    ) as caught:
        if path == "first forward":
            net(torch.randn(2, 3))
        elif path == "di.build":
            di.build(net, (2, 3))
        else:
            di.materialize(net)
    assert isinstance(caught.value.__cause__, InitFailedError)
    if path == "first forward":
        assert di.pending(net) == ["2"]  # layers before the failing one stay built
    elif path == "di.build":
        assert di.pending(net) == ["0", "2"]
    else:
        assert all(p.is_meta for p in net.parameters())


def test_interrupt_while_the_layer_takes_over_the_built_state_rolls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import deferinit._become._become as become_module  # noqa: PLC0415 - patched for this test only

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    layer = dnn.Linear(4)
    objects = placeholders(layer)
    # The guard is made after the placeholders took the real tensors in place.
    monkeypatch.setattr(become_module, "guard_for", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layer(torch.randn(2, 3))
    assert_untouched(layer, objects)
    monkeypatch.undo()
    assert layer(torch.randn(2, 3)).shape == (2, 4)
