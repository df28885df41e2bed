"""``di.materialize(seed=)`` on every core (docs/design.md §4.3): independent layers
are computed by ``torch.get_num_threads()`` worker threads at once, with exactly the
values one thread gives; layers running user code are computed by the calling
thread; a failure anywhere leaves the whole model as it was."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.modules import module as torch_module
from torch.testing._internal.distributed.fake_pg import FakeStore

import deferinit as di
from deferinit import nn as dnn
from deferinit._fill import _parallel

Make = Callable[[], nn.Module]

# Tests that declare modules on meta on purpose; the warning is pinned in
# test_unrecorded_init.py.
declared_on_meta = pytest.mark.filterwarnings("ignore::deferinit.UnrecordedInitWarning")


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """``threads(n)``: torch's thread count for this test; put back after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def computed_by() -> Iterator[list[int]]:
    """The thread that computed each layer's values in worker threads."""
    seen: list[int] = []
    compute = _parallel._compute

    def spy(*args: object) -> object:
        seen.append(threading.get_ident())
        return compute(*args)  # type: ignore[arg-type]

    original = _parallel._compute
    _parallel._compute = spy  # type: ignore[assignment]
    yield seen
    _parallel._compute = original


def mixed() -> nn.Module:
    """Deferred twins of several kinds, a layer declared on meta, parameter-free ones."""
    with torch.device("meta"):
        declared = nn.Linear(24, 24)
    model = nn.Sequential(
        dnn.Linear(24),
        nn.ReLU(),
        dnn.LayerNorm(),
        dnn.TransformerEncoderLayer(nhead=4, dim_feedforward=48, dropout=0.0),
        declared,
        dnn.BatchNorm1d(),
        dnn.Linear(10),
    )
    return di.build(model, (3, 5, 16), device="meta")


def seeded(make: Make, seed: int = 0, **options: object) -> dict[str, torch.Tensor]:
    model = di.materialize(make(), seed=seed, **options)  # type: ignore[arg-type]
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@declared_on_meta
def test_seeded_values_do_not_depend_on_the_thread_count(
    threads: Callable[[int], None], computed_by: list[int]
) -> None:
    threads(1)
    want = seeded(mixed)
    assert computed_by == []  # one thread: no workers
    for n in (2, 3, 8):
        threads(n)
        assert_equal(seeded(mixed), want)
    assert computed_by  # some layers were computed in workers


def test_independent_layers_are_computed_in_worker_threads(
    threads: Callable[[int], None], computed_by: list[int]
) -> None:
    threads(2)
    model = di.build(nn.Sequential(*(dnn.Linear(32) for _ in range(6))), (2, 8), device="meta")
    di.materialize(model, seed=0)
    assert len(computed_by) == 6
    assert threading.get_ident() not in computed_by
    assert torch.get_num_threads() == 2  # the caller's count, unchanged


def test_new_threads_keep_the_callers_thread_count(threads: Callable[[int], None]) -> None:
    threads(2)
    model = di.build(nn.Sequential(*(dnn.Linear(8) for _ in range(3))), (2, 8), device="meta")
    di.materialize(model, seed=0)  # each worker ran with one intra-op thread
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [2]


class Block(nn.Module):
    """A class of the user's own: its code runs in the calling thread."""

    made_by: list[int] = []

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        if not self.fc.weight.is_meta:
            Block.made_by.append(threading.get_ident())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


def test_user_code_runs_in_the_calling_thread_and_values_match_one_thread(
    threads: Callable[[int], None],
) -> None:
    initialized_by: list[int] = []

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            initialized_by.append(threading.get_ident())
            nn.init.normal_(module.weight, std=0.02)

    def make() -> nn.Module:
        deferred_block = di.defer(Block, dim=di.dim(-1))
        model = nn.Sequential(dnn.Linear(8), deferred_block(), dnn.Linear(8), dnn.Linear(4))
        model = di.build(model, (2, 6), device="meta")
        di.initialize(model[2], init)
        return model

    threads(1)
    want = seeded(make)
    threads(2)
    Block.made_by.clear()
    initialized_by.clear()
    assert_equal(seeded(make), want)
    assert Block.made_by == [threading.get_ident()]
    assert initialized_by == [threading.get_ident()]


def test_an_initializer_mapping_to_torch_init_functions_runs_in_workers(
    threads: Callable[[int], None], computed_by: list[int]
) -> None:
    def make() -> nn.Module:
        model = di.build(nn.Sequential(*(dnn.Linear(16) for _ in range(4))), (2, 8), device="meta")
        return di.initialize(model, {"*.weight": nn.init.xavier_uniform_, "*.bias": nn.init.ones_})

    threads(1)
    want = seeded(make)
    threads(2)
    computed_by.clear()
    assert_equal(seeded(make), want)
    assert len(computed_by) == 4
    assert all(torch.equal(v, torch.ones(16)) for k, v in want.items() if k.endswith("bias"))


def test_layers_sharing_a_tensor_stay_tied_and_match_one_thread(
    threads: Callable[[int], None],
) -> None:
    def make() -> nn.Sequential:
        model = di.build(
            nn.Sequential(dnn.Linear(6), dnn.Linear(6), dnn.Linear(6), dnn.Linear(6)),
            (2, 6),
            device="meta",
        )
        model[3].weight = model[1].weight
        return model

    threads(1)
    want = seeded(make)
    threads(2)
    model = di.materialize(make(), seed=0)
    assert model[3].weight is model[1].weight
    assert_equal({k: v.clone() for k, v in model.state_dict().items()}, want)


@pytest.mark.parametrize("position", [0, 3, 5])
def test_a_failure_in_a_worker_leaves_every_tensor_on_meta_under_its_own_object(
    threads: Callable[[int], None],
    computed_by: list[int],
    monkeypatch: pytest.MonkeyPatch,
    position: int,
) -> None:
    reset = nn.Linear.reset_parameters

    def fails_for_one_width(self: nn.Linear) -> None:  # torch's own class: in a worker
        reset(self)
        if not self.weight.is_meta and self.out_features == 13:
            raise KeyboardInterrupt  # what Ctrl-C in the middle would raise

    layers: list[nn.Module] = [dnn.Linear(16) for _ in range(6)]
    layers[position] = dnn.Linear(13)
    model = di.build(nn.Sequential(*layers), (2, 16), device="meta")
    before = dict(model.named_parameters())
    torch.manual_seed(3)
    rng, python = torch.get_rng_state(), random.getstate()
    threads(2)
    monkeypatch.setattr(nn.Linear, "reset_parameters", fails_for_one_width)
    with pytest.raises(KeyboardInterrupt):
        di.materialize(model, seed=0)
    assert computed_by  # the failing layer ran in a worker
    for name, t in model.named_parameters():
        assert t is before[name] and t.is_meta, name
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == python
    assert torch.get_num_threads() == 2
    monkeypatch.undo()
    di.materialize(model, seed=0)  # a corrected call succeeds
    assert not any(t.is_meta for t in model.parameters())


def six_linears() -> nn.Sequential:
    return di.build(nn.Sequential(*(dnn.Linear(16) for _ in range(6))), (2, 16), device="meta")


def test_a_failure_in_the_calling_thread_while_workers_run_ahead_changes_nothing(
    threads: Callable[[int], None],
) -> None:
    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and not module.weight.is_meta:
            raise ValueError("not this layer")

    model = six_linears()
    di.initialize(model[2], init)  # computed in the calling thread, after 0 and 1 are placed
    before = dict(model.named_parameters())
    threads(2)
    with pytest.raises(di.InferenceError, match="not this layer"):
        di.materialize(model, seed=0)
    for name, t in model.named_parameters():
        assert t is before[name] and t.is_meta, name
    threads(1)
    want = seeded(six_linears)
    threads(2)
    di.initialize(model[2], lambda module: None)  # corrected: changes nothing
    di.materialize(model, seed=0)
    assert_equal(dict(model.state_dict()), want)


def test_no_registration_hook_is_left_behind(threads: Callable[[int], None]) -> None:
    hooks = torch_module._global_parameter_registration_hooks
    before = dict(hooks)
    threads(2)
    model = di.build(nn.Sequential(*(dnn.Linear(8) for _ in range(4))), (2, 8), device="meta")
    di.materialize(model, seed=0)
    assert dict(hooks) == before


def test_progress_bar_counts_every_byte_with_workers(
    threads: Callable[[int], None], capsys: pytest.CaptureFixture[str]
) -> None:
    threads(2)
    model = di.build(nn.Sequential(*(dnn.Linear(64) for _ in range(5))), (2, 64), device="meta")
    di.materialize(model, seed=0, progress=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    err = capsys.readouterr().err
    assert "materialize" in err
    assert "100%" in err
    assert f"{total / 1000:.1f}k" in err or str(total) in err


@pytest.fixture
def rank_zero_of_two() -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_seeded_slices_do_not_depend_on_the_thread_count(
    rank_zero_of_two: None, threads: Callable[[int], None]
) -> None:
    def make() -> nn.Sequential:
        model = nn.Sequential(
            dnn.Linear(32),
            dnn.TransformerEncoderLayer(nhead=4, dim_feedforward=64, dropout=0.0),
            dnn.Linear(8),
        )
        return di.build(model, (2, 3, 16), device="meta")

    threads(1)
    single = seeded(make, 7)
    for n in (1, 2):
        threads(n)
        model = make()
        for layer in model:
            fully_shard(layer)
        di.materialize(model, seed=7)
        for name, got in model.state_dict().items():
            assert isinstance(got, DTensor), name
            want = single[name]
            rows = -(-want.shape[0] // 2)  # Shard(0) over two ranks: rank 0's rows
            assert torch.equal(got.to_local(), want[:rows]), (n, name)


@pytest.mark.parametrize("seed", ["0", 1.5, [0]], ids=["str", "float", "list"])
def test_a_seed_that_is_not_an_integer_is_refused_before_anything_is_allocated(
    seed: object,
) -> None:
    model = di.build(nn.Sequential(dnn.Linear(4)), (2, 3), device="meta")
    placeholder = model[0].weight
    with pytest.raises(TypeError, match=r"seed must be an integer .* Fix: pass an int"):
        di.materialize(model, seed=seed)  # type: ignore[arg-type]
    assert model[0].weight is placeholder and placeholder.is_meta


def test_an_integer_seed_of_another_integer_type_equals_the_int() -> None:
    def make() -> nn.Linear:
        return di.build(dnn.Linear(4), (2, 3), device="meta")  # type: ignore[return-value]

    index = type("Index", (), {"__index__": lambda self: 7})()
    by_int = di.materialize(make(), seed=7)
    by_index = di.materialize(make(), seed=index)
    assert torch.equal(by_int.weight, by_index.weight)
