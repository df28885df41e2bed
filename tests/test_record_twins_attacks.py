"""Adversarial tests of deferred twins inside ``di.deferred_init`` (docs/design.md §4.3):
twins constructed at their place in program order at replay, init calls on their
placeholders replayed where they were made, values loaded before ``di.materialize``
never overwritten, all or nothing (Ctrl-C included), and sharded replays.

The reference is always the same model written with every size, constructed eagerly
under the same seed. Each test pins behaviour that holds.

This file is also the script each of two gloo ranks runs for the sharded test
(``python -m torch.distributed.run --nproc_per_node 2 tests/test_record_twins_attacks.py``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import deferinit as di
from deferinit import nn as dnn
from deferinit._record import RecordError, ReplayError
from deferinit._record._engine import Engine
from rank_script import run_as_rank
from test_record_support import differing

TwoRanks = Callable[[Path], str]


def recorded_and_built(factory: Callable[..., nn.Module], shape: Any, *args: Any) -> Any:
    model = di.deferred_init(factory, *args)
    di.build(model, shape, device="meta")
    return model


# -- init calls interleaved with eager draws -----------------------------------------------


class Interleaved(nn.Module):
    """Several init calls on each twin's placeholders, between eager draws, random and
    not, through ``.data`` and ``torch.nn.init``."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6) if explicit else dnn.Linear(6)
        self.noise1 = nn.Parameter(torch.randn(3))
        self.a.weight.data.normal_(0, 0.5)
        self.noise2 = nn.Parameter(torch.rand(2))
        self.b = nn.Linear(6, 5) if explicit else dnn.Linear(5)
        nn.init.uniform_(self.b.weight, -0.3, 0.3)
        self.a.bias.data.uniform_(-1, 1)
        self.register_buffer("noise3", torch.randn(2))
        nn.init.normal_(self.b.bias)
        self.a.weight.data.mul_(2.0)
        self.a.weight.data.add_(1.0)
        nn.init.constant_(self.b.bias, 0.5)
        self.b.bias.data.normal_()
        self.a.bias.data.clamp_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


def test_interleaved_init_calls_and_draws_replay_bitwise_and_leave_the_rng_where_eager_does() -> (
    None
):
    torch.manual_seed(7)
    eager = Interleaved(explicit=True)
    after_eager = torch.randn(4)
    model = recorded_and_built(Interleaved, (2, 4), False)
    torch.manual_seed(7)
    di.materialize(model)
    assert differing(eager, model) == []
    assert torch.equal(torch.randn(4), after_eager)
    x = torch.randn(3, 4)
    assert torch.equal(model(x), eager(x))


class Inner(nn.Module):
    def __init__(self, explicit: bool, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 3) if explicit else dnn.Linear(3)
        self.p = nn.Parameter(torch.empty(3))
        nn.init.trunc_normal_(self.p, std=0.02)
        self.lin.bias.data.zero_()
        self.lin.weight.data.uniform_(-0.1, 0.1)


class Outer(nn.Module):
    """Twins in a ModuleList and a ModuleDict; the forward runs them out of
    registration order."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"x": Inner(explicit, 3)})
        self.blocks = nn.ModuleList([Inner(explicit, 5), Inner(explicit, 3)])
        self.pre = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for block in self.blocks:
            x = block.get_submodule("lin")(x)
        out: torch.Tensor = self.heads["x"].get_submodule("lin")(x)
        return out


def test_twins_deep_in_containers_replay_in_program_order_not_forward_order() -> None:
    torch.manual_seed(0)
    eager = Outer(explicit=True)
    model = recorded_and_built(Outer, (2, 5), False)
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []


# -- ties, sharing, explicit sizes, dtype defaults -----------------------------------------


class TiedHead(nn.Module):
    """The LM-head tie made on a twin inside the construction."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False) if explicit else dnn.Linear(10, bias=False)
        self.head.weight = self.emb.weight
        self.extra = nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(self.emb(x)))
        return out


def test_a_tie_made_on_a_twin_in_the_construction_is_kept_and_the_rest_is_eager() -> None:
    torch.manual_seed(0)
    eager = TiedHead(explicit=True)
    tokens = torch.empty(2, 3, dtype=torch.long, device="meta")
    model = recorded_and_built(TiedHead, tokens, False)
    torch.manual_seed(0)
    di.materialize(model)
    assert model.head.weight is model.emb.weight
    assert differing(eager, model) == []


class Shared(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        layer = nn.Linear(4, 4) if explicit else dnn.Linear(4)
        self.a = layer
        self.noise = nn.Parameter(torch.randn(3))
        self.b = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


def test_a_twin_registered_at_two_places_is_constructed_once_at_its_declaration() -> None:
    torch.manual_seed(0)
    eager = Shared(explicit=True)
    model = recorded_and_built(Shared, (2, 4), False)
    torch.manual_seed(0)
    di.materialize(model)
    assert model.a is model.b
    assert differing(eager, model) == []


def test_a_twin_given_every_size_inside_the_construction_is_plain_recorded_code() -> None:
    def factory(explicit: bool) -> nn.Module:
        middle = nn.Linear(4, 5) if explicit else dnn.Linear(5, in_features=4)
        return nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(5, 2))

    torch.manual_seed(0)
    eager = factory(True)
    model = di.deferred_init(factory, False)
    assert di.is_built(model)
    torch.manual_seed(0)
    di.materialize(model)
    assert differing(eager, model) == []


def test_a_twin_declared_under_another_default_dtype_replays_in_that_dtype() -> None:
    def factory(explicit: bool) -> nn.Module:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            wide = nn.Linear(3, 4) if explicit else dnn.Linear(4)
        finally:
            torch.set_default_dtype(previous)
        return nn.Sequential(nn.Linear(2, 3), wide)

    torch.manual_seed(0)
    eager = factory(True)
    model = recorded_and_built(factory, (1, 2), False)
    torch.manual_seed(0)
    di.materialize(model)
    assert model[1].weight.dtype == torch.float64
    assert differing(eager, model) == []


def test_reset_and_rebuild_on_meta_before_materialize_still_replays_in_place() -> None:
    def factory(explicit: bool, width: int = 3) -> nn.Module:
        middle = nn.Linear(width, 5) if explicit else dnn.Linear(5)
        return nn.Sequential(nn.Linear(2, 3), middle, nn.Linear(5, 2))

    model = recorded_and_built(factory, (1, 2), False)
    di.reset(model)
    assert di.pending(model) == ["1"]
    di.build(model, (1, 2), device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert differing(factory(True), model) == []


# -- loaded values are never overwritten -----------------------------------------------------


class Pair(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.noise = nn.Parameter(torch.randn(2))
        self.b = nn.Linear(4, 2) if explicit else dnn.Linear(2)
        self.b.weight.data.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(x))
        return out


def test_a_fully_loaded_mixed_model_materializes_without_drawing() -> None:
    eager = Pair(explicit=True)
    model: Any = di.deferred_init(Pair, False)
    di.load_state_dict(model, eager.state_dict())
    state = torch.get_rng_state()
    di.materialize(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert differing(eager, model) == []


def test_a_twin_partly_loaded_keeps_its_value_and_everything_else_is_eager() -> None:
    torch.manual_seed(5)
    eager = Pair(explicit=True)
    model = recorded_and_built(Pair, (2, 3), False)
    di.load_state_dict(model, {"b.weight": torch.full((2, 4), 3.0)}, strict=False)
    torch.manual_seed(5)
    di.materialize(model)
    assert torch.equal(model.b.weight, torch.full((2, 4), 3.0))
    for name in ("a.weight", "a.bias", "noise", "b.bias"):
        assert torch.equal(model.get_parameter(name), eager.get_parameter(name)), name


# -- materialize's options -------------------------------------------------------------------


class Simple(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 4)
        self.body = nn.Sequential(
            nn.Linear(4, 5) if explicit else dnn.Linear(5),
            nn.ReLU(),
            nn.Linear(5, 2) if explicit else dnn.Linear(2),
        )
        self.post = nn.Parameter(torch.randn(2))
        self.register_buffer("table", torch.rand(3))
        self.body.get_parameter("0.weight").data.normal_(0, 0.1)
        nn.init.trunc_normal_(self.pre.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(self.pre(x)) + self.post
        return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_materialize_dtype_equals_eager_construction_then_to_dtype(dtype: torch.dtype) -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    torch.manual_seed(0)
    di.materialize(model, dtype=dtype, device="cpu")
    torch.manual_seed(0)
    eager = Simple(explicit=True).to(dtype)
    assert differing(eager, model) == []


def test_materialize_under_a_default_device_context_equals_eager_there() -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    with torch.device("cpu"):
        torch.manual_seed(0)
        di.materialize(model)
        torch.manual_seed(0)
        eager = Simple(explicit=True)
    assert differing(eager, model) == []


def test_seed_gives_twins_in_a_recording_the_values_of_the_same_twins_outside_one() -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    di.materialize(model, seed=11)
    body = nn.Sequential(dnn.Linear(5), nn.ReLU(), dnn.Linear(2))
    body.get_parameter("0.weight").data.normal_(0, 0.1)
    holder = nn.Module()
    holder.body = body
    di.build(body, (2, 4), device="meta")
    di.materialize(holder, seed=11)
    for name in ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"):
        assert torch.equal(model.get_parameter(name), holder.get_parameter(name)), name
    # ...and the values of the same construction recorded with every size written out.
    explicit = di.materialize(di.deferred_init(Simple, True), seed=11)
    assert differing(explicit, model) == []


def test_seed_leaves_the_default_generator_alone_for_mixed_records() -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    state = torch.get_rng_state()
    di.materialize(model, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_progress_bar_is_shown_when_asked_and_changes_no_value() -> None:
    shown = recorded_and_built(Simple, (2, 3), False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        torch.manual_seed(0)
        di.materialize(shown, progress=True)
    assert "materialize" in err.getvalue() and "100%" in err.getvalue()
    quiet = recorded_and_built(Simple, (2, 3), False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        torch.manual_seed(0)
        di.materialize(quiet, progress=False)
    assert err.getvalue() == ""
    torch.manual_seed(0)
    eager = Simple(explicit=True)
    assert differing(eager, shown) == [] and differing(eager, quiet) == []


def test_an_initializer_registered_inside_the_factory_reaches_explicit_layers_and_twins() -> None:
    def ones(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.ones_(module.weight)

    def factory() -> nn.Module:
        net = nn.Sequential(nn.Linear(3, 4), dnn.Linear(2))
        di.initialize(net, ones)
        return net

    model = recorded_and_built(factory, (2, 3))
    di.materialize(model)
    assert torch.equal(model[0].weight, torch.ones(4, 3))
    assert torch.equal(model.get_parameter("1.weight"), torch.ones(2, 4))


def test_an_initializer_registered_after_recording_reaches_the_twins() -> None:
    # (What it does to the recorded explicit layers is in the report: it is dropped.)
    model = di.deferred_init(lambda: nn.Sequential(nn.Linear(3, 4), dnn.Linear(2)))
    di.initialize(model[1], {"weight": nn.init.ones_})
    di.build(model, (2, 3), device="meta")
    di.materialize(model)
    assert torch.equal(model.get_parameter("1.weight"), torch.ones(2, 4))


# -- all or nothing --------------------------------------------------------------------------


def meta_state(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("interrupted", [1, 2])
def test_ctrl_c_in_a_twins_initializer_leaves_all_on_meta_and_a_retry_gives_eager(
    interrupted: int,
) -> None:
    model = di.deferred_init(Simple, False)
    calls = {"n": 0}

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not module.weight.is_meta:
            calls["n"] += 1
            if calls["n"] == interrupted:
                raise KeyboardInterrupt

    di.initialize(model.body, init)
    di.build(model, (2, 3), device="meta")
    objects = meta_state(model)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        di.materialize(model)
    assert all(t.is_meta for t in meta_state(model))
    assert all(a is b for a, b in zip(meta_state(model), objects, strict=True))
    assert torch.equal(torch.get_rng_state(), state)
    calls["n"] = -100  # the next run is not interrupted
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert differing(Simple(explicit=True), model) == []
    assert all(a is b for a, b in zip(meta_state(model), objects, strict=True))


def test_ctrl_c_between_two_recorded_operations_leaves_all_on_meta_and_a_retry_is_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    objects = meta_state(model)
    run = Engine.run
    count = {"n": 0}

    def interrupted(self: Engine, op: Any) -> None:
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt
        run(self, op)

    monkeypatch.setattr(Engine, "run", interrupted)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        di.materialize(model)
    assert all(t.is_meta for t in meta_state(model))
    monkeypatch.undo()
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    assert differing(Simple(explicit=True), model) == []
    assert all(a is b for a, b in zip(meta_state(model), objects, strict=True))


def test_a_failing_twin_initializer_names_the_layer_and_leaves_all_on_meta() -> None:
    def broken(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not module.weight.is_meta:
            raise ValueError("bad init")

    model = di.deferred_init(Simple, False)
    di.initialize(model.body[2], broken)
    di.build(model, (2, 3), device="meta")
    with pytest.raises(di.InferenceError, match=r"body\.2") as caught:
        di.materialize(model)
    assert isinstance(caught.value.__cause__, ValueError)
    assert all(t.is_meta for t in meta_state(model))


def test_materializing_twice_leaves_the_values_of_the_first() -> None:
    model = recorded_and_built(Simple, (2, 3), False)
    torch.manual_seed(0)
    di.materialize(model)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    di.materialize(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in values.items())


def test_init_call_on_a_twin_taking_a_recorded_tensor_is_refused_at_recording() -> None:
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.tensor(2.0)
            self.lin = dnn.Linear(4)
            self.lin.weight.data.mul_(self.gain)

    with pytest.raises(
        RecordError, match=r"mul_ on a deferred layer's placeholder .*takes a tensor the"
    ):
        di.deferred_init(Gain)


def test_copies_of_a_built_mixed_record_materialize_to_eager_independently() -> None:
    model = recorded_and_built(Interleaved, (2, 4), False)
    torch.manual_seed(3)
    eager = Interleaved(explicit=True)
    for clone in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        copied = clone(model)
        torch.manual_seed(3)
        di.materialize(copied)
        assert differing(eager, copied) == []
    assert all(t.is_meta for t in meta_state(model))


# -- sharded: FSDP2 and tensor parallel on two gloo ranks ------------------------------------


class Net(nn.Module):
    """Twins with init calls queued between eager draws, to be sharded."""

    def __init__(self, twin: bool) -> None:
        super().__init__()
        self.up = dnn.Linear(16) if twin else nn.Linear(8, 16)
        self.pos = nn.Parameter(torch.randn(4, 8))
        self.down = dnn.Linear(8) if twin else nn.Linear(16, 8)
        self.down.weight.data.normal_(0, 0.02)
        self.gain = nn.Parameter(torch.rand(8))
        self.down.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(torch.relu(self.up(x + self.pos[0]))) * self.gain
        return out


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: t.full_tensor() if isinstance(t, DTensor) else t
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }


def sharded(mode: str, mesh: Any) -> Any:
    model: Any = recorded_and_built(Net, torch.Size([2, 8]), True)
    if mode == "fsdp":
        fully_shard(model.up, mesh=mesh)
        fully_shard(model.down, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return model


def rank_main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    eager = full(Net(twin=False))
    armed = {"on": True}

    def interrupt(module: nn.Module) -> None:
        if armed["on"] and not module.weight.is_meta:
            raise KeyboardInterrupt

    for mode in ("fsdp", "tp"):
        model = sharded(mode, mesh)
        torch.manual_seed(0)
        got = full(di.materialize(model))
        assert [n for n in eager if not torch.equal(got[n], eager[n])] == [], mode

        # Ctrl-C in a twin's initializer: every shard back on meta, the same objects.
        model = sharded(mode, mesh)
        di.initialize(model.down, interrupt)
        before = dict(model.named_parameters())
        armed["on"] = True
        try:
            di.materialize(model)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError(f"{mode}: no interrupt")
        after = dict(model.named_parameters())
        assert all(p.is_meta for p in after.values()), mode
        assert all(after[n] is before[n] for n in before), mode
        armed["on"] = False  # di.initialize(..., None) would not unregister it: see report
        torch.manual_seed(0)
        got = full(di.materialize(model))
        assert [n for n in eager if not torch.equal(got[n], eager[n])] == [], f"{mode} retry"
    print(f"rank {dist.get_rank()} ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_mixed_records_with_queued_calls_are_exact_and_all_or_nothing(
    two_ranks: TwoRanks,
) -> None:
    out = two_ranks(Path(__file__))
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


if __name__ == "__main__":
    run_as_rank(rank_main)


def test_a_twin_deep_copied_inside_a_recording_is_refused_with_the_fix() -> None:
    # nn.TransformerEncoder clones its layer; the clones would have no place of their
    # own in the record. Refused at the recording, never a bare torch error.
    def factory() -> nn.Module:
        layer = dnn.TransformerEncoderLayer(2, 16, batch_first=True)
        return nn.TransformerEncoder(cast(Any, layer), 2, enable_nested_tensor=False)

    with pytest.raises(RecordError, match=r"deep-copied inside the recorded construction.*Fix"):
        di.deferred_init(factory)
    with pytest.raises(RecordError, match="deep-copied"):
        di.deferred_init(lambda: nn.ModuleList([copy.deepcopy(dnn.Linear(8))]))


class _TiedHead(nn.Module):
    def __init__(self, init: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.lm_head = dnn.Linear(11, bias=True)
        self.lm_head.weight = self.wte.weight  # tied before the head's build
        self.lm_head.apply(init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.wte(ids))
        return out


def _zero_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.weight)


def _zero_biases(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def test_an_apply_inside_a_recording_on_a_twins_tied_tensor_is_refused_not_lost() -> None:
    ids = torch.randint(0, 11, (2, 3))
    model = di.deferred_init(_TiedHead, _zero_weights)
    di.build(model, ids, device="meta")
    with pytest.raises(ReplayError, match=r"layer 'lm_head'.*changes 'weight'.*tied.*Fix"):
        di.materialize(model)
    assert model.wte.weight.is_meta
    # A function that leaves the tied tensor alone replays as eager's.
    torch.manual_seed(0)
    eager = nn.Module()
    eager.wte = nn.Embedding(11, 6)
    eager.lm_head = nn.Linear(6, 11)
    eager.lm_head.weight = eager.wte.weight
    eager.lm_head.apply(_zero_biases)
    model = di.deferred_init(_TiedHead, _zero_biases)
    di.build(model, ids, device="meta")
    torch.manual_seed(0)
    di.materialize(model)
    for key, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
