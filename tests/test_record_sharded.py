"""Recorded models (``di.deferred_init``) sharded on 2 gloo ranks, then materialized:
FSDP2 (``fully_shard``, ``Shard(0)``) and tensor parallelism (``parallelize_module``
with ``ColwiseParallel``/``RowwiseParallel``: ``Shard(0)``/``Shard(1)``). Each rank
allocates only its shards and holds exactly the slice of single-process eager
construction; with ``seed=`` exactly the slice of the single-process ``seed=`` values;
a mixed model's twins are placed too; all or nothing.

This file is also the script each rank runs (``python -m torch.distributed.run
--nproc_per_node 2 tests/test_record_sharded.py``); every rank checks its own shards
and prints ``rank N ok``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import deferinit as di
from deferinit import nn as dnn
from rank_script import run_as_rank

TwoRanks = Callable[[Path], str]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_fsdp_meta.py"


class Net(nn.Module):
    """Init loop, a draw between layers, a buffer computed from a parameter."""

    def __init__(self, twin: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.pos = nn.Parameter(torch.randn(4, 8))
        self.down = dnn.Linear(8) if twin else nn.Linear(16, 8)
        for m in self.modules():
            if isinstance(m, nn.Linear | dnn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        self.register_buffer("norm", self.up.weight.detach().norm(dim=1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(torch.relu(self.up(x + self.pos[0])))
        return out


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: t.full_tensor() if isinstance(t, DTensor) else t
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }


def check(what: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), (what, got.keys(), want.keys())
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, f"{what}: {bad} differ"


def recorded(mode: str, mesh: Any, twin: bool) -> nn.Module:
    model: Any = di.deferred_init(Net, twin)
    if twin:
        di.build(model, torch.Size([2, 8]), device="meta")
    if mode == "fsdp":
        fully_shard(model.up, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    return model  # type: ignore[no-any-return]


def _orthogonal(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)  # needs the whole matrix, and draws for all of it


def rank_main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    eager = full(Net())
    single_seeded = full(di.materialize(di.deferred_init(Net), seed=3))
    for mode in ("fsdp", "tp"):
        model = recorded(mode, mesh, twin=False)
        sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
        assert sharded, mode
        torch.manual_seed(0)
        di.materialize(model)
        check(mode, full(model), eager)
        for name, p in model.named_parameters():
            if isinstance(p, DTensor):  # only this rank's shard is allocated
                local = p.to_local()
                if any(isinstance(place, Shard) for place in p.placements):
                    assert local.numel() < p.numel(), (mode, name)
                assert local.untyped_storage().nbytes() == local.numel() * local.element_size()
        model(torch.randn(2, 8)).sum().backward()

        seeded = di.materialize(recorded(mode, mesh, twin=False), seed=3)
        check(f"{mode} seed", full(seeded), single_seeded)

        mixed = recorded(mode, mesh, twin=True)
        torch.manual_seed(0)
        check(f"{mode} mixed", full(di.materialize(mixed)), eager)

        # An initializer registered on recorded layers runs on each whole tensor.
        for init in (_orthogonal, {"*weight": nn.init.orthogonal_}):
            reference: Any = di.deferred_init(Net)
            di.initialize(reference, init)
            torch.manual_seed(0)
            di.materialize(reference)
            single_after = torch.get_rng_state()
            model = recorded(mode, mesh, twin=False)
            di.initialize(model, init)
            torch.manual_seed(0)
            di.materialize(model)
            check(f"{mode} initializer", full(model), full(reference))
            assert torch.equal(torch.get_rng_state(), single_after), mode

        # All or nothing: a failure after the replay puts every shard back on meta.
        broken = recorded(mode, mesh, twin=False)
        before = {n: p for n, p in broken.named_parameters()}
        try:
            di.materialize(broken, dtype=torch.int64)  # type: ignore[arg-type]
        except Exception:
            pass
        assert all(p.is_meta for p in broken.parameters()), mode
        assert {n: p for n, p in broken.named_parameters()}.keys() == before.keys()
    print(f"rank {rank} ok")
    dist.barrier()
    dist.destroy_process_group()


def test_recorded_models_shard_exactly_on_two_gloo_ranks(two_ranks: TwoRanks) -> None:
    out = two_ranks(Path(__file__))
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


def test_hugging_face_llama_recorded_sharded_and_trained(two_ranks: TwoRanks) -> None:
    out = two_ranks(EXAMPLE)
    assert "equal to eager construction: True" in out
    assert "tied embedding kept: True" in out
    assert "training step: True" in out
    held = next(line for line in out.splitlines() if line.startswith("rank 0 holds"))
    _, _, _, local, _, total, *_ = held.split()
    assert 0 < int(local) < int(total)


if __name__ == "__main__":
    run_as_rank(rank_main)
