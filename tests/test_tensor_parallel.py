"""Tensor parallelism (``parallelize_module`` with ``ColwiseParallel`` and
``RowwiseParallel``) on a model built on meta, then ``di.materialize``: each rank
holds exactly the matching slice of the single-process values (docs/design.md §3.9,
§4.3), and each layer's initialization runs once however its tensors are sharded.

The two-rank test starts ``python -m torch.distributed.run --nproc_per_node 2
tests/test_tensor_parallel.py``: this file is also the script each rank runs, on
gloo; every rank checks its own shards and prints ``rank N ok`` (or raises). The
other tests play one rank of a fake process group in this process (no collective
runs during materialize), for 2-D meshes and for counting initializations.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.testing._internal.distributed.fake_pg import FakeStore

import deferinit as di
from deferinit import nn as dnn

TwoRanks = Callable[[Path], str]

IN, HIDDEN, OUT = 8, 33, 16  # 33: uneven shards on two ranks (17 and 16 rows)
EVEN = 32  # torch's tensor-parallel forward needs even shards
PLAN = {"0": ColwiseParallel(), "2": RowwiseParallel()}


def deferred_mlp(hidden: int = HIDDEN) -> nn.Sequential:
    """The MLP written with deferred layers and built on meta (no memory)."""
    model = nn.Sequential(dnn.Linear(hidden), nn.ReLU(), dnn.Linear(OUT))
    return di.build(model, (4, IN), device="meta")


def declared_mlp(hidden: int = HIDDEN) -> nn.Sequential:
    """The same MLP declared under torch.device("meta") with its sizes written out."""
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, OUT))


def eager_mlp(hidden: int = HIDDEN) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, OUT))


def materialized(
    make: Callable[[], nn.Sequential], mesh: DeviceMesh | None, **options: object
) -> nn.Sequential:
    """``make()``, tensor-parallel over ``mesh`` (if given), materialized under seed 0."""
    model = make()
    if mesh is not None:
        parallelize_module(model, mesh, PLAN)
    torch.manual_seed(0)
    di.materialize(model, device="cpu", **options)  # type: ignore[arg-type]
    return model


def expected_local(full: torch.Tensor, sharded: DTensor) -> torch.Tensor:
    """The rank's part of ``full`` by torch's own rule (no communication)."""
    placed = distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None)
    return placed.to_local()


def check_slices(model: nn.Module, reference: nn.Sequential, rank: int) -> None:
    """Every parameter is sharded as the plan says and holds bitwise the rank's
    part of the single-process value; spelled out for two ranks."""
    rows = slice(0, 17) if rank == 0 else slice(17, 33)  # HIDDEN = 33 over two ranks
    full = {name: p.detach() for name, p in reference.named_parameters()}
    want = {
        "0.weight": (Shard(0), full["0.weight"][rows]),
        "0.bias": (Shard(0), full["0.bias"][rows]),
        "2.weight": (Shard(1), full["2.weight"][:, rows]),
        "2.bias": (Replicate(), full["2.bias"]),
    }
    params = dict(model.named_parameters())
    assert list(params) == list(want)
    for name, (placement, value) in want.items():
        got = params[name]
        assert isinstance(got, DTensor), name
        assert got.placements == (placement,), (name, got.placements)
        assert got.shape == full[name].shape, name
        local = got.to_local()
        assert local.dtype == value.dtype, (name, local.dtype)
        assert torch.equal(local, value), name
        # The rank allocates only its shard.
        assert local.untyped_storage().nbytes() == local.numel() * local.element_size(), name


# --- two gloo ranks ------------------------------------------------------------------------


def run_checks() -> None:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    eager = eager_mlp()
    for make in (deferred_mlp, declared_mlp):
        check_slices(materialized(make, mesh), eager, rank)

    # The sharded forward (an all-reduce of partial sums) equals eager's up to the
    # order of the additions.
    torch.manual_seed(0)
    even = eager_mlp(EVEN)
    model = materialized(lambda: deferred_mlp(EVEN), mesh)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), even(x))

    double = materialized(deferred_mlp, mesh, dtype=torch.float64)
    check_slices(double, eager.to(torch.float64), rank)

    # seed=: the slices of the single-process seeded values, whatever the world size.
    single = materialized(deferred_mlp, None, seed=5)
    sharded = materialized(deferred_mlp, mesh, seed=5)
    check_slices(sharded, single, rank)


def rank_main() -> None:
    # declared_mlp's plain Linears have no init code beyond their reset_parameters.
    warnings.filterwarnings("ignore", category=di.UnrecordedInitWarning)
    dist.init_process_group("gloo")
    try:
        run_checks()
        dist.barrier()  # both ranks are past every collective before either tears down
        print(f"rank {dist.get_rank()} ok", flush=True)
    finally:
        dist.destroy_process_group()


def exit_without_finalizing(code: int) -> NoReturn:
    """End the rank without tearing down the interpreter: DTensor's sharding caches
    keep the gloo group alive, and its worker threads can abort a finalizing
    interpreter (see tests/test_fsdp_edges.py)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def test_each_rank_holds_the_slice_of_single_process_values_on_two_gloo_ranks(
    two_ranks: TwoRanks,
) -> None:
    out = two_ranks(Path(__file__))
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


# --- one rank of a fake process group, in this process -------------------------------------


@pytest.fixture
def fake_rank(request: pytest.FixtureRequest) -> Iterator[int]:
    """Plays rank ``request.param`` (default 0) of a fake group of 4."""
    rank = getattr(request, "param", 0)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
    try:
        yield rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fake_rank", [0, 1, 2, 3], indirect=True)
def test_fsdp_over_tensor_parallel_gives_each_rank_its_part(fake_rank: int) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = deferred_mlp()
    parallelize_module(model, mesh["tp"], PLAN)
    fully_shard(model, mesh=mesh["dp"])  # strided shards on top of the column shards
    torch.manual_seed(0)
    di.materialize(model)
    torch.manual_seed(0)
    eager = eager_mlp()
    for name, got in model.named_parameters():
        assert isinstance(got, DTensor), name
        want = expected_local(eager.get_parameter(name).detach(), got)
        assert torch.equal(got.to_local(), want), name


class CountedLinear(nn.Linear):
    """Counts initializations on real tensors (dry runs on meta excluded)."""

    runs = 0

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not self.weight.is_meta:
            type(self).runs += 1


@pytest.mark.parametrize("sharding", ["fsdp", "tensor parallel"])
def test_a_sharded_layer_is_initialized_once_not_once_per_tensor(
    fake_rank: int, sharding: str
) -> None:
    deferred = di.defer(CountedLinear, in_features=di.dim(-1))
    layers = 3
    model = di.build(
        nn.Sequential(*(deferred(out_features=64) for _ in range(layers))), (2, 64), device="meta"
    )
    mesh = init_device_mesh("cpu", (4,))
    if sharding == "fsdp":
        for layer in model:
            fully_shard(layer, mesh=mesh)
    else:
        parallelize_module(model, mesh, {str(i): ColwiseParallel() for i in range(layers)})
    CountedLinear.runs = 0
    torch.manual_seed(0)
    di.materialize(model)
    assert CountedLinear.runs == layers
    torch.manual_seed(0)
    eager = nn.Sequential(*(CountedLinear(64, 64) for _ in range(layers)))
    for name, got in model.named_parameters():
        assert isinstance(got, DTensor), name
        want = expected_local(eager.get_parameter(name).detach(), got)
        assert torch.equal(got.to_local(), want), name


if __name__ == "__main__":
    try:
        rank_main()
    except BaseException:
        traceback.print_exc()
        exit_without_finalizing(1)
    exit_without_finalizing(0)
