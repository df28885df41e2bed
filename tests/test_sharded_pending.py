"""Init calls queued on a twin's placeholders (``layer.weight.data.fill_(0.5)``)
before a build on meta run at ``di.materialize`` also once the model is sharded on
2 gloo ranks: FSDP2 (``fully_shard``) and tensor parallelism
(``parallelize_module``) replace the layer's tensors by new DTensors, which carry
no queue, so the calls are kept on the layer by tensor name at the build. Every
rank holds exactly the slice of the single-process values, without and with
``seed=``, for plain models and recorded ones (``di.deferred_init``). The same
holds in one process for a tensor replaced after the build, and for a copy
(``copy.deepcopy``, pickle) of a layer built on meta.

This file is also the script each rank runs (``python -m torch.distributed.run
--nproc_per_node 2 tests/test_sharded_pending.py``); every rank checks its own
shards and prints ``rank N ok``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from rank_script import run_as_rank

TwoRanks = Callable[[Path], str]


def declared() -> nn.Sequential:
    """Twins with init calls waiting on their placeholders, one of them random."""
    first, last = dnn.Linear(16), dnn.Linear(8)
    last.weight.data.fill_(0.5)
    last.bias.data.uniform_(-5, 5)
    nn.init.zeros_(first.bias)
    return nn.Sequential(first, nn.ReLU(), last)


def plain() -> nn.Module:
    model = declared()
    di.build(model, (2, 8), device="meta")
    return model


def recorded() -> nn.Module:
    model: nn.Module = di.deferred_init(declared)
    di.build(model, (2, 8), device="meta")
    return model


def sharded(make: Callable[[], nn.Module], mode: str, mesh: Any) -> nn.Module:
    model: Any = make()
    if mode == "fsdp":
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    assert any(isinstance(p, DTensor) for p in model.parameters()), mode
    return model  # type: ignore[no-any-return]


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: t.full_tensor() if isinstance(t, DTensor) else t
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }


def rank_main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for kind, make in (("plain", plain), ("recorded", recorded)):
        for seed in (None, 3):
            torch.manual_seed(0)
            want = full(di.materialize(make(), seed=seed))
            assert bool((want["2.weight"] == 0.5).all()), (kind, seed)
            assert bool((want["0.bias"] == 0).all()), (kind, seed)
            for mode in ("fsdp", "tp"):
                model = sharded(make, mode, mesh)
                torch.manual_seed(0)
                got = full(di.materialize(model, seed=seed))
                assert got.keys() == want.keys(), (kind, seed, mode)
                bad = [n for n in want if not torch.equal(got[n], want[n])]
                assert not bad, f"{kind} seed={seed} {mode}: {bad} differ"
    print(f"rank {rank} ok")
    dist.barrier()
    dist.destroy_process_group()


def test_queued_init_calls_run_on_sharded_models_on_two_gloo_ranks(
    two_ranks: TwoRanks,
) -> None:
    out = two_ranks(Path(__file__))
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


def _built_on_meta_with_a_waiting_call() -> Any:
    layer = dnn.Linear(3)
    layer.weight.data.fill_(0.5)
    di.build(layer, (2, 4), device="meta")
    return layer


def test_queued_init_calls_run_on_a_tensor_replaced_after_a_meta_build() -> None:
    # What fully_shard and parallelize_module do, in one process: a new meta
    # tensor, without the queue, under the built layer's name.
    for seed in (None, 3):
        layer = _built_on_meta_with_a_waiting_call()
        layer._parameters["weight"] = nn.Parameter(torch.empty(3, 4, device="meta"))
        di.materialize(layer, seed=seed)
        assert torch.equal(layer.weight, torch.full((3, 4), 0.5)), seed


def test_queued_init_calls_travel_with_copies_of_a_meta_built_layer() -> None:
    # torch's Parameter.__deepcopy__ drops the tensor's own __dict__ (the queue).
    layer = _built_on_meta_with_a_waiting_call()
    for made in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        di.materialize(made)
        assert torch.equal(made.weight, torch.full((3, 4), 0.5))


if __name__ == "__main__":
    run_as_rank(rank_main)
