"""``di.reset`` (docs/design.md §3.10): the very parameter objects come back as placeholders,
so state dicts and optimizers made before or after the reset keep working; nested
layers reset; many build/reset cycles leak neither memory nor modules.
"""

from __future__ import annotations

import gc
import resource
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

import deferinit as di
import test_layers as layers
from deferinit import nn as dnn

AssertSameState = Callable[[nn.Module, nn.Module], None]


def _has_parameters(case: layers.Case) -> bool:
    with torch.device("meta"):
        return any(True for _ in layers.eager(case).parameters())


# MultiheadAttention with inferred kdim/vdim is left out: its parameter names
# depend on the sizes (in_proj_weight when they equal embed_dim, q_proj_weight
# ... otherwise), so a placeholder cannot know them.
WITH_PARAMETERS = [
    pytest.param(c, id=c.id, marks=c.marks) for c in layers.KNOWN_NAMES if _has_parameters(c)
]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    return []


def _loss(output: Any) -> torch.Tensor:
    return sum((t.float().sum() for t in _tensors(output) if t.requires_grad), torch.zeros(()))


def test_every_twin_configuration_with_parameters_is_covered() -> None:
    assert len(WITH_PARAMETERS) >= 45


@pytest.mark.parametrize("case", WITH_PARAMETERS)
def test_reset_of_every_twin_keeps_its_parameter_objects_and_state_dict_keys(
    case: layers.Case, assert_same_state: AssertSameState
) -> None:
    inputs = case.inputs()
    layer = layers.twin(case)
    layer(*inputs)
    built = dict(layer.named_parameters())
    reference = layers.eager(case)
    eager_buffers = [n for n, _ in reference.named_buffers()]

    di.reset(layer)

    after = dict(layer.named_parameters())
    if case.inferred:
        assert isinstance(layer, di.Deferred)
        assert all(isinstance(p, UninitializedParameter) for p in after.values())
    assert list(after) == list(built)
    assert all(after[name] is p for name, p in built.items())
    assert [n for n, _ in layer.named_buffers()] == eager_buffers  # nothing parked there
    assert list(layer.state_dict()) == list(reference.state_dict())

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)  # made after the reset
    torch.manual_seed(0)
    _loss(layer(*inputs)).backward()
    torch.manual_seed(0)
    reference = layers.eager(case)
    _loss(reference(*inputs)).backward()
    assert all(dict(layer.named_parameters())[n] is p for n, p in built.items())
    assert_same_state(layer, reference)
    optimizer.step()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert_same_state(layer, reference)  # the optimizer trained the rebuilt layer


def test_optimizer_made_before_the_build_trains_after_reset_and_rebuild() -> None:
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    di.reset(net)
    assert all(p.grad is None for p in net.parameters())
    net(torch.randn(4, 5)).sum().backward()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.step()
    held = optimizer.param_groups[0]["params"]
    assert all(a is b for a, b in zip(held, net.parameters(), strict=True))
    assert held[0].shape == (8, 5)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_reset_state_dict_lists_every_key_and_loads_into_a_fresh_model() -> None:
    net = nn.Sequential(dnn.Linear(8), dnn.BatchNorm1d(), dnn.Linear(2))
    net(torch.randn(4, 3))
    di.reset(net)
    keys = list(net.state_dict())
    assert keys == list(
        nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).state_dict()
    )


# --- nested layers --------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(dnn.Linear(width), nn.ReLU(), dnn.Linear(width))
        self.norm = dnn.LayerNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.body(x))  # type: ignore[no-any-return]


def test_reset_of_a_layer_nested_in_a_sequential_in_a_block_reinfers_only_it() -> None:
    model = nn.Sequential(Block(6), dnn.Linear(2))
    model(torch.randn(2, 4))
    inner = model.get_submodule("0.body.0")
    objects = [inner.weight, inner.bias]
    di.reset(inner)
    assert di.pending(model) == ["0.body.0"]
    assert [inner.weight, inner.bias] == objects
    assert all(a is b for a, b in zip([inner.weight, inner.bias], objects, strict=True))
    assert model(torch.randn(2, 9)).shape == (2, 2)
    assert inner.in_features == 9 and model.get_submodule("1").in_features == 6
    assert inner.weight is objects[0] and inner.weight.shape == (6, 9)


class Stack(nn.Module):
    """A user block holding a twin: its own constructor declares ``head``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.head = dnn.Linear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))  # type: ignore[no-any-return]


LazyStack = di.defer(Stack, in_dim=di.dim(-1))


def test_reset_of_a_deferred_block_holding_twins_reinfers_it_and_keeps_its_objects() -> None:
    model = nn.Sequential(LazyStack(out_dim=5), nn.Tanh())
    block: Any = model[0]
    x4, x7 = torch.randn(2, 4), torch.randn(2, 7)
    model(x4)
    proj_weight = block.proj.weight
    di.reset(model)
    assert di.pending(model) == ["0"]
    assert block.proj.weight is proj_weight  # the block's own parameter object
    torch.manual_seed(0)
    out = model(x7)
    torch.manual_seed(0)
    proj, head = nn.Linear(7, 5), nn.Linear(5, 3)  # drawn in the block's order
    head_type: type = type(block.head)
    assert type(block) is Stack and head_type is nn.Linear
    assert block.proj.weight is proj_weight
    assert torch.equal(proj_weight, proj.weight)
    assert torch.equal(block.head.weight, head.weight)
    assert torch.equal(out, torch.tanh(head(torch.relu(proj(x7)))))


# --- many cycles ------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


CYCLES = 1000


def test_build_reset_cycles_keep_memory_flat_and_leave_no_module_alive() -> None:
    x3, x5 = torch.randn(2, 3), torch.randn(2, 5)
    net = nn.Sequential(dnn.Linear(16), nn.ReLU(), dnn.Linear(4))
    for x in (x3, x5) * 25:  # warm-up: caches and allocator pools settle
        net(x)
        di.reset(net)
    gc.collect()
    start = _rss_mib()
    for i in range(CYCLES):
        net(x3 if i % 2 else x5)
        di.reset(net)
    gc.collect()
    grown = _rss_mib() - start
    assert grown < 4, f"RSS grew by {grown:.1f} MiB over {CYCLES} build/reset cycles"

    layers_ = list(net)
    refs = [weakref.ref(m) for m in [net, *layers_]]
    del net, layers_
    assert all(ref() is None for ref in refs)  # freed at once, without the collector
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_training_goes_on_after_reset_while_a_graph_from_before_is_alive() -> None:
    # The ordinary loop: the last loss of the old sizes still holds its graph (and the
    # parameters' gradient accumulators) while the first forward of the new sizes runs.
    net = nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(torch.randn(4, 20)).sum()
    loss.backward()
    opt.step()
    di.reset(net)
    loss = net(torch.randn(4, 30)).sum()
    loss.backward()
    first = net[0]
    assert isinstance(first, nn.Linear)
    before = first.weight.detach().clone()
    opt.step()
    assert first.weight.grad is not None and first.weight.grad.shape == (8, 30)
    assert not torch.equal(first.weight, before)  # the optimizer made before trains it


@pytest.mark.parametrize(
    "convert",
    [lambda m: m.half().float(), lambda m: m.bfloat16().double()],
    ids=["half-float", "bfloat16-double"],
)
def test_a_rebuild_after_reset_rounds_through_the_conversions_as_the_first_build(
    convert: Callable[[nn.Module], nn.Module],
) -> None:
    layer = convert(dnn.Linear(3))
    torch.manual_seed(0)
    di.build(layer, (2, 4))
    di.reset(layer)
    torch.manual_seed(0)
    di.build(layer, (2, 4))
    torch.manual_seed(0)
    eager = convert(nn.Linear(4, 3))
    assert isinstance(layer, nn.Linear) and isinstance(eager, nn.Linear)
    assert torch.equal(layer.weight, eager.weight) and torch.equal(layer.bias, eager.bias)


def test_a_reset_meta_built_model_called_on_data_says_to_materialize() -> None:
    net = di.build(nn.Sequential(dnn.Linear(8)), (2, 3), device="meta")
    di.reset(net)
    x = torch.randn(2, 4)
    with pytest.raises(di.InferenceError, match=r"layer '0'.*on meta.*di\.materialize\(model\)"):
        net(x)
    assert di.pending(net) == ["0"]
    di.build(net, x, device="meta")
    di.materialize(net)
    assert net(x).shape == (2, 8)
