"""Deferred twins inside a recorded construction (issue 10 item 3, docs/design.md §3).

A mixed model — explicit ``torch.nn`` layers, random tensors drawn in ``__init__``,
deferred twins, init loops over ``self.modules()`` — recorded with
``di.deferred_init``, sized by ``di.build(..., device="meta")`` or a checkpoint, and
materialized: bitwise the same model written with every size explicit, constructed
eagerly under the same seed. The twins are constructed at their declaration, in
program order, and init calls made on their placeholders run where they were made.
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit import nn as dnn
from deferinit._record import RecordError
from test_record_support import differing


class Mixed(nn.Module):
    """d2l's ViT pattern: a draw in ``__init__`` between layers, then an init loop."""

    def __init__(self, features: int | None, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.pos = nn.Parameter(torch.randn(1, 6) * 0.02)
        self.body = dnn.Linear(hidden) if features is None else nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = dnn.Linear(3) if features is None else nn.Linear(hidden, 3)
        self.register_buffer("table", torch.rand(4))
        # A deferred layer is an instance of its twin class until it is built (see
        # docs/decisions.md), so an init loop names both.
        for m in self.modules():
            if isinstance(m, nn.Linear | dnn.Linear) and m is not self.stem:
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.norm(self.body(self.stem(x) + self.pos)))
        return out


def eager_mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mixed(6)


def recorded_mixed() -> Any:
    return di.deferred_init(Mixed, None)


def test_twins_in_a_recording_stay_deferred_and_draw_nothing() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = recorded_mixed()
    assert torch.equal(torch.get_rng_state(), before)
    assert isinstance(model.body, di.Deferred) and isinstance(model.head, di.Deferred)
    assert di.pending(model) == ["body", "head"]


def test_mixed_model_built_on_meta_materializes_bitwise_eager() -> None:
    eager = eager_mixed()
    model = recorded_mixed()
    di.build(model, torch.Size([2, 5]), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []
    x = torch.randn(2, 5)
    assert torch.equal(model(x), eager(x))


def test_the_rng_after_materialize_is_where_eager_construction_leaves_it() -> None:
    eager_mixed()
    after_eager = torch.randn(3)
    model = recorded_mixed()
    di.build(model, torch.Size([2, 5]), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    assert torch.equal(torch.randn(3), after_eager)


def test_parameter_objects_of_twins_are_kept_so_an_early_optimizer_trains() -> None:
    model = recorded_mixed()
    di.build(model, torch.Size([2, 5]), device="meta")
    kept = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    di.materialize(model)
    assert [id(p) for p in model.parameters()] == kept
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)


class DataInit(nn.Module):
    """d2l's linear regression: ``.data.normal_`` on a deferred layer in ``__init__``,
    with eager draws after it."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1) if explicit else dnn.Linear(1)
        self.net.weight.data.normal_(0, 0.01)
        self.net.bias.data.fill_(0)
        self.noise = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def test_init_on_a_twin_placeholder_runs_at_its_place_in_program_order() -> None:
    torch.manual_seed(1)
    eager = DataInit(explicit=True)
    model: Any = di.deferred_init(DataInit, False)
    di.build(model, torch.Size([2, 4]), device="meta")
    torch.manual_seed(1)
    di.materialize(model)
    assert differing(eager, model) == []


def test_sizes_from_a_checkpoint_then_materialize_the_rest_bitwise() -> None:
    # The twins' values come from the checkpoint (and size them); the rest of the
    # construction replays around their constructions, so it equals eager's.
    eager = eager_mixed()
    saved = {k: v + 1.0 for k, v in eager.state_dict().items() if k.startswith(("body", "head"))}
    model = recorded_mixed()
    result = di.load_state_dict(model, saved, strict=False)
    assert sorted(result.missing_keys) == [
        "norm.bias",
        "norm.weight",
        "pos",
        "stem.bias",
        "stem.weight",
        "table",
    ]
    torch.manual_seed(0)
    di.materialize(model)
    loaded = {k: model.state_dict()[k] for k in saved}
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    rest = [k for k in eager.state_dict() if k not in saved]
    assert all(torch.equal(model.state_dict()[k], eager.state_dict()[k]) for k in rest)


def test_materialize_never_overwrites_values_loaded_into_a_recorded_model() -> None:
    model = di.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    ones = {k: torch.ones(v.shape) for k, v in model.state_dict().items()}
    di.load_state_dict(model, ones)
    di.materialize(model)
    assert all(torch.equal(t, torch.ones(t.shape)) for t in model.state_dict().values())


def test_partially_loaded_recorded_model_fills_the_rest_with_eager_values() -> None:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    torch.manual_seed(3)
    eager = factory()
    model: Any = di.deferred_init(factory)
    di.load_state_dict(model, {"0.weight": torch.ones(4, 3)}, strict=False)
    torch.manual_seed(3)
    di.materialize(model)
    assert torch.equal(model[0].weight, torch.ones(4, 3))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(model.get_parameter(name), eager.get_parameter(name))


def test_an_unbuilt_twin_in_a_recording_is_refused_before_anything_is_allocated() -> None:
    model = recorded_mixed()
    with pytest.raises(di.NotBuiltError, match=r"'body'.*di.build"):
        di.materialize(model)
    assert model.stem.weight.is_meta and model.pos.is_meta and model.table.is_meta


def test_seed_gives_twins_in_a_recording_their_own_generators() -> None:
    # seed=: each tensor from its qualified name, whatever else the model holds.
    model = recorded_mixed()
    di.build(model, torch.Size([2, 5]), device="meta")
    di.materialize(model, seed=5)
    alone = nn.Sequential()
    alone.add_module("body", dnn.Linear(8))
    di.build(alone, torch.Size([2, 6]), device="meta")
    di.materialize(alone, seed=5)
    # Both ran body's own init (kaiming) then the queued normal_(std=0.02) and zeros_.
    assert torch.equal(model.body.bias, torch.zeros(8))
    assert model.body.weight.std().item() == pytest.approx(0.02, rel=0.5)
    assert not torch.equal(model.body.weight, model.head.weight[:, :1].expand(3, 8)[:1])


class Scaled(nn.Module):
    """GPT-2's residual rescaling, read from the twin's built sizes afterwards."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6) if explicit else dnn.Linear(6)
        self.emb = nn.Embedding(10, 6)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


def test_named_parameters_loop_over_twin_placeholders_replays_bitwise() -> None:
    torch.manual_seed(2)
    eager = Scaled(True)
    model: Any = di.deferred_init(Scaled, False)
    di.build(model, torch.Size([1, 6]), device="meta")
    torch.manual_seed(2)
    di.materialize(model)
    assert differing(eager, model) == []


def test_a_recorded_mixed_model_survives_deepcopy_and_pickle_before_materialize() -> None:
    eager = eager_mixed()
    for clone in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        model = clone(recorded_mixed())
        di.build(model, torch.Size([2, 5]), device="meta")
        torch.manual_seed(0)
        di.materialize(model)
        assert differing(eager, model) == []


def uniform_small(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.uniform_(m.weight, -0.1, 0.1)


class Block(nn.Module):
    def __init__(self, width: int | None) -> None:
        super().__init__()
        self.inner = dnn.Linear(4) if width is None else nn.Linear(width, 4)
        if width is not None:
            uniform_small(self.inner)  # as a registered initializer, right after the build
        self.scale = nn.Parameter(torch.rand(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x) * self.scale
        return out


def test_twins_in_nested_blocks_and_a_registered_initializer_replay_in_order() -> None:
    torch.manual_seed(4)
    eager = nn.Sequential(Block(3), nn.Linear(4, 4), Block(4))
    # A recorded (explicit) layer gets the registered initializer once the replay
    # filled it, as a module declared on meta gets it at materialize.
    uniform_small(eager[1])
    model: Any = di.deferred_init(lambda: nn.Sequential(Block(None), nn.Linear(4, 4), Block(None)))
    di.initialize(model, uniform_small)
    di.build(model, torch.Size([1, 3]), device="meta")
    torch.manual_seed(4)
    di.materialize(model)
    assert differing(eager, model) == []


def test_a_twin_declared_in_a_recording_then_dropped_is_refused_before_allocating() -> None:
    # Eager construction would have drawn its random numbers; without sizes the
    # replay cannot, so it refuses rather than give other values.
    def factory() -> nn.Module:
        model = nn.Sequential(nn.Linear(3, 4))
        dnn.Linear(5)  # declared, never kept
        model.append(nn.Linear(4, 2))
        return model

    model: Any = di.deferred_init(factory)
    with pytest.raises(RecordError, match=r"dropped from the model.*Nothing was allocated"):
        di.materialize(model)
    assert all(t.is_meta for t in model.parameters())


def test_an_initializer_registered_on_a_recorded_model_runs_after_the_replay() -> None:
    model: Any = di.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    di.initialize(model, {"*weight": nn.init.ones_})
    di.materialize(model)
    assert torch.equal(model[0].weight, torch.ones(4, 3))
    assert torch.equal(model[1].weight, torch.ones(2, 4))


def test_a_later_initialize_none_replaces_an_earlier_initializer() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4))
    net = nn.Sequential(dnn.Linear(4))
    di.initialize(net, {"*": nn.init.ones_})
    di.build(net, torch.Size([1, 3]), device="meta")
    di.initialize(net, None)  # the latest registration wins: the layer's own init
    torch.manual_seed(0)
    di.materialize(net)
    assert differing(eager, net) == []
