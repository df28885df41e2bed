"""deferred_init records, allocates nothing, draws nothing; materialize_recorded
replays bitwise, keeps objects, frees intermediates, is all or nothing."""

from __future__ import annotations

import copy
import pickle
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import deferinit._record._engine as engine_module
from deferinit._record import RecordError, ReplayError, Undo, deferred_init, replay_recorded
from deferinit._record._deferred_init import RECORD_KEY
from test_record_support import differing, materialize_recorded, recorded_and_eager


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.BatchNorm1d(7), nn.Linear(7, 3))


def test_recorded_model_has_its_own_class_and_only_meta_tensors() -> None:
    model: Any = deferred_init(mlp)
    assert type(model) is nn.Sequential and type(model[0]) is nn.Linear
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}
    assert type(model[0].weight) is nn.Parameter and model[0].weight.requires_grad
    assert not model[2].running_mean.requires_grad


def test_recording_draws_nothing_from_the_default_generator() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    deferred_init(mlp)
    assert torch.equal(torch.get_rng_state(), before)


def test_replay_is_bitwise_eager_construction() -> None:
    eager, model = recorded_and_eager(mlp)
    assert differing(eager, model) == []
    assert RECORD_KEY not in model.__dict__


def test_factory_arguments_are_passed() -> None:
    torch.manual_seed(1)
    eager = nn.Conv2d(3, 4, kernel_size=3, bias=False)
    model: Any = deferred_init(nn.Conv2d, 3, 4, kernel_size=3, bias=False)
    torch.manual_seed(1)
    assert torch.equal(materialize_recorded(model).weight, eager.weight)


def test_parameter_objects_are_kept_and_an_earlier_optimizer_trains_them() -> None:
    model: Any = deferred_init(mlp)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    materialize_recorded(model)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    before = [p.detach().clone() for p in params]
    model(torch.randn(4, 5)).square().sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_a_tie_is_one_placeholder_and_one_real_parameter() -> None:
    def tied() -> nn.Module:
        m = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6, bias=False))
        m[1].weight = m[0].weight  # type: ignore[index]
        return m

    eager, model = recorded_and_eager(tied)
    assert model[1].weight is model[0].weight
    assert differing(eager, model) == []


def test_in_place_init_of_a_slice_lands_in_the_slice() -> None:
    def sliced() -> nn.Module:
        m = nn.Linear(6, 6)
        with torch.no_grad():
            m.weight[2:4, 1:].normal_(5.0, 0.1)
            m.weight.view(-1)[::7].fill_(-1.0)
        return m

    eager, model = recorded_and_eager(sliced)
    assert differing(eager, model) == []


def test_dtype_converts_like_module_to_after_eager_construction() -> None:
    torch.manual_seed(0)
    eager = mlp().to(torch.float64)
    model: Any = deferred_init(mlp)
    torch.manual_seed(0)
    materialize_recorded(model, dtype=torch.float64)
    assert differing(eager, model) == []
    assert model[2].num_batches_tracked.dtype == torch.long


def test_factory_must_return_a_module() -> None:
    with pytest.raises(RecordError, match=r"returned FakeTensor, expected an nn.Module"):
        deferred_init(torch.zeros, 3)  # type: ignore[type-var]


def test_nested_deferred_init_is_recorded_by_the_outer_one() -> None:
    def outer() -> nn.Module:
        return nn.Sequential(deferred_init(nn.Linear, 2, 3), nn.Linear(3, 1))

    eager_factory = lambda: nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))  # noqa: E731
    torch.manual_seed(0)
    eager = eager_factory()
    model: Any = deferred_init(outer)
    torch.manual_seed(0)
    materialize_recorded(model)
    assert differing(eager, model) == []


def test_a_real_tensor_given_to_the_factory_is_read_at_replay() -> None:
    table = torch.arange(12.0).reshape(3, 4)

    def from_table(t: torch.Tensor) -> nn.Module:
        m = nn.Linear(4, 3)
        with torch.no_grad():
            m.weight.copy_(t * 2)
        return m

    model: Any = materialize_recorded(deferred_init(from_table, table))
    assert torch.equal(model.weight, table * 2)


def test_intermediate_storages_are_freed_after_their_last_use() -> None:
    def with_temporary() -> nn.Module:
        m = nn.Linear(4, 4)
        big = torch.randn(256, 256)
        with torch.no_grad():
            m.weight.copy_(big[:4, :4])
        return m

    model: Any = deferred_init(with_temporary)
    record = model.__dict__[RECORD_KEY]
    randn = next(i for i, op in enumerate(record.ops) if "randn" in str(op.func))
    big = record.ops[randn].creates[0][0]
    freed_at = [i for i, sids in enumerate(record.plan.free_after) if big in sids]
    copy = next(i for i, op in enumerate(record.ops) if "copy_" in str(op.func))
    assert freed_at == [copy]
    seen: list[int] = []
    original = engine_module.Engine.free

    def spy(self: engine_module.Engine, storages: Iterable[int]) -> None:
        original(self, storages)
        seen.append(sum(s.nbytes() for s in self.env.values()))

    engine_module.Engine.free = spy  # type: ignore[method-assign, assignment]
    try:
        torch.manual_seed(0)
        materialize_recorded(model)
    finally:
        engine_module.Engine.free = original  # type: ignore[method-assign]
    assert max(seen) >= 256 * 256 * 4  # the temporary existed...
    assert seen[-1] < 256 * 256 * 4  # ...and is gone once copied from


def test_dead_deterministic_work_is_skipped_but_dead_draws_still_happen() -> None:
    def wasteful() -> nn.Module:
        torch.zeros(1000).add_(1)  # never reaches the model: skipped
        torch.randn(3)  # never reaches the model, but eager drew it: replayed
        return nn.Linear(2, 2)

    model: Any = deferred_init(wasteful)
    record = model.__dict__[RECORD_KEY]
    skipped = [
        str(op.func) for op, need in zip(record.ops, record.plan.needed, strict=True) if not need
    ]
    assert skipped == ["aten.zeros.default", "aten.add_.Tensor"]
    torch.manual_seed(0)
    eager = wasteful()
    torch.manual_seed(0)
    assert differing(eager, materialize_recorded(model)) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_failed_replay_leaves_model_and_generator_as_they_were(
    error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    model: Any = deferred_init(mlp)
    weight = model[0].weight
    original = engine_module.Engine.run
    calls = []

    def failing(self: engine_module.Engine, op: object) -> None:
        calls.append(op)
        if len(calls) == 5:
            raise error("interrupted")
        original(self, op)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module.Engine, "run", failing)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    expected = ReplayError if error is RuntimeError else KeyboardInterrupt
    with pytest.raises(expected, match="interrupted"):
        materialize_recorded(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert model[0].weight is weight and weight.is_meta
    monkeypatch.undo()
    eager = (torch.manual_seed(0), mlp())[1]
    torch.manual_seed(0)
    assert differing(eager, materialize_recorded(model)) == []
    assert model[0].weight is weight


def test_a_failed_swap_is_undone() -> None:
    model: Any = deferred_init(mlp)
    view = model[3].bias[:1]  # a live view: its data cannot move under the object
    with pytest.raises(ReplayError, match=r"'3.bias' \(parameter\).*a view of it"):
        materialize_recorded(model)
    assert all(p.is_meta for p in model.parameters())
    del view
    assert not materialize_recorded(model)[3].bias.is_meta


def test_a_weakly_referenced_parameter_keeps_its_object_through_replay() -> None:
    torch.manual_seed(0)
    eager = mlp()
    model: Any = deferred_init(mlp)
    bias = model[3].bias
    keep = weakref.ref(bias)
    torch.manual_seed(0)
    materialize_recorded(model)
    assert keep() is bias and model[3].bias is bias and not bias.is_meta
    assert differing(eager, model) == []


def test_a_recorded_model_pickles_and_deep_copies_before_materialize() -> None:
    torch.manual_seed(0)
    eager = mlp()
    model = deferred_init(mlp)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.manual_seed(0)
        assert differing(eager, materialize_recorded(copied)) == []
    assert all(p.is_meta for p in model.parameters())


def test_separately_recorded_models_put_together_replay_in_order() -> None:
    def pair() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))

    torch.manual_seed(0)
    eager = pair()
    parent = nn.Sequential(deferred_init(nn.Linear, 3, 3), deferred_init(nn.Linear, 3, 2))
    torch.manual_seed(0)
    assert differing(eager, materialize_recorded(parent)) == []


def test_the_default_dtype_in_effect_while_recording_is_the_one_replayed() -> None:
    def double() -> nn.Module:
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # as transformers does for torch_dtype=
        try:
            m = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
            m.register_buffer("tenth", torch.full((3,), 0.1) + torch.linspace(0, 1, 3))
            return m
        finally:
            torch.set_default_dtype(old)

    eager, model = recorded_and_eager(double)
    assert model[0].weight.dtype == torch.float64
    assert differing(eager, model) == []


def test_a_failing_factory_propagates_and_recording_works_after() -> None:
    def broken() -> nn.Module:
        nn.Linear(2, 2)
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        deferred_init(broken)
    eager, model = recorded_and_eager(mlp)
    assert differing(eager, model) == []


def test_seed_gives_each_tensor_values_from_its_name_alone() -> None:
    def small() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))

    def bigger() -> nn.Module:  # the same names in another model, with more draws
        m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 9))
        with torch.no_grad():
            m[1].weight.normal_()  # type: ignore[operator]  # a second draw on 1.weight: its values change
        return m

    state = torch.get_rng_state()
    a: Any = materialize_recorded(deferred_init(small), seed=3)
    b: Any = materialize_recorded(deferred_init(bigger), seed=3)
    c: Any = materialize_recorded(deferred_init(small), seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[1].bias, b[1].bias)
    assert not torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[0].weight, c[0].weight)


def test_every_literal_form_reaches_the_record() -> None:
    class Literals(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            arr = np.arange(4, dtype=np.float32)
            self.register_buffer("a", torch.as_tensor([1.0, 2.0]))
            self.register_buffer("b", torch.asarray([3, 4]))
            self.register_buffer("c", torch.tensor(arr) * 2)
            self.register_buffer("d", torch.from_numpy(arr) + 1)
            self.register_buffer("e", torch.zeros(2).new_tensor([5.0, 6.0]))
            self.g = torch.scalar_tensor(7.0)

    eager, model = recorded_and_eager(Literals)
    assert differing(eager, model) == []
    assert torch.equal(model.g, eager.g) and not model.g.is_meta


def test_legacy_tensor_constructors_are_recorded() -> None:
    class Old(nn.Module):  # nn.Parameter(torch.Tensor(out, in)), still common
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.Tensor(4, 3))
            self.b = nn.Parameter(torch.FloatTensor(4))
            self.c = nn.Parameter(torch.Tensor([1.0, 2.0]))
            nn.init.kaiming_uniform_(self.w)
            nn.init.uniform_(self.b, -1, 1)

    eager, model = recorded_and_eager(Old)
    assert differing(eager, model) == []


def test_undo_steps_put_every_placeholder_and_the_record_back() -> None:
    # di.materialize logs these and runs them, newest first, when a later step fails.
    model: Any = deferred_init(mlp)
    weight = model[0].weight
    undo: list[Undo] = []
    replay_recorded(model, undo=undo)
    assert not weight.is_meta and RECORD_KEY not in model.__dict__
    assert all(action() is None for action in reversed(undo))
    assert model[0].weight is weight and weight.is_meta
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.manual_seed(0)
    eager = mlp()
    torch.manual_seed(0)
    assert differing(eager, materialize_recorded(model)) == []
