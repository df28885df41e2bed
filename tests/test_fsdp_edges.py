"""FSDP2 sharded materialization, the harder cases, on 2 gloo ranks: each shard owns
only its slice's memory; a tensor tied across modules stays one tensor; modules
declared on meta converted with ``dtype=``; copies of one twin starting equal;
``seed=`` values equal with and without sharding, also where one tensor's
initialization reads another's value.

This file is also the script each rank runs: the test starts
``python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp_edges.py``; every
rank checks its own shards against a single-process model built in the same process
and prints ``rank N ok`` (or raises).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import deferinit as di
from deferinit import nn as dnn

TwoRanks = Callable[[Path], str]


class CopiesBias(nn.Module):
    """Initialization that reads another tensor's value: the mirror falls back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, 8)
        self.b = nn.Linear(8, 8)
        with torch.no_grad():
            self.b.bias.copy_(self.a.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))  # type: ignore[no-any-return]


class TiedHead(nn.Module):
    """Declared on meta with its sizes; the head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))  # type: ignore[no-any-return]


DeferredCopiesBias = di.defer(CopiesBias, dim=di.dim(-1))


def mixed() -> nn.Module:
    with torch.device("meta"):
        declared = nn.Linear(12, 6)
    return nn.Sequential(dnn.Linear(12), nn.ReLU(), declared, DeferredCopiesBias())


def stacked() -> nn.Module:
    """Copies of one unbuilt twin (they start equal), each bias drawn anew after."""
    layer = dnn.Linear(8)
    model = nn.Sequential(*(copy.deepcopy(layer) for _ in range(3)))
    di.initialize(model, {"*bias": nn.init.normal_})
    return di.build(model, (3, 8), device="meta")


def shard(model: nn.Module) -> nn.Module:
    # A tensor shared by two modules must sit in one FSDP unit (FSDP2's rule): the
    # tied model is sharded as a whole, the others layer by layer.
    if not isinstance(model, TiedHead):
        for layer in model.children():
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
    fully_shard(model)
    return model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for n, p in model.named_parameters()
    }


def check(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want), (name, list(got), list(want))
    for key, value in want.items():
        assert got[key].dtype == value.dtype, (name, key, got[key].dtype, value.dtype)
        assert torch.equal(got[key], value), (name, key)


def materialized(build: Callable[[], nn.Module], *, sharded: bool, **options: object) -> nn.Module:
    model = build()
    if sharded:
        shard(model)
    torch.manual_seed(0)
    di.materialize(model, device="cpu", **options)  # type: ignore[arg-type]
    return model


def rank_main() -> None:
    dist.init_process_group("gloo")
    try:
        run_checks()
        # Both ranks are past every collective before either one tears down.
        dist.barrier()
        print(f"rank {dist.get_rank()} ok", flush=True)
    finally:
        dist.destroy_process_group()


def exit_without_finalizing(code: int) -> NoReturn:
    """End the rank without tearing down the interpreter.

    destroy_process_group cannot stop the gloo group's worker threads here: DTensor's
    sharding caches keep the device mesh, hence the group, alive. A worker that drops
    the last reference to a finished collective's tensor must take the GIL; once the
    interpreter is finalizing, taking it ends the thread inside a noexcept destructor,
    and the process aborts ("terminate called without an active exception", about 1
    run in 20 on a loaded machine). Leaving with os._exit never finalizes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_checks() -> None:
    def meta_mixed() -> nn.Module:
        return di.build(mixed(), (3, 12), device="meta")

    for options in ({}, {"dtype": torch.float64}, {"seed": 5}):
        single = full(materialized(meta_mixed, sharded=False, **options))
        sharded = materialized(meta_mixed, sharded=True, **options)
        check(f"mixed {options}", full(sharded), single)
        for name, p in sharded.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p  # type: ignore[attr-defined]
            owned = local.untyped_storage().nbytes()
            assert owned == local.numel() * local.element_size(), (name, owned)
        assert torch.equal(single["3.b.bias"], single["3.a.bias"])

    for options in ({}, {"seed": 5}):
        single_stack = full(materialized(stacked, sharded=False, **options))
        check(
            f"stacked {options}", full(materialized(stacked, sharded=True, **options)), single_stack
        )
        starts_equal = torch.equal(single_stack["0.weight"], single_stack["2.weight"])
        assert starts_equal == (not options), options  # seed= follows the names
        assert not torch.equal(single_stack["0.bias"], single_stack["2.bias"])

    for options in ({}, {"seed": 5}):
        single_tied = materialized(TiedHead, sharded=False, **options)
        sharded_tied = materialized(TiedHead, sharded=True, **options)
        for model in (single_tied, sharded_tied):
            assert model.get_parameter("head.weight") is model.get_parameter("emb.weight")
        check(f"tied {options}", full(sharded_tied), full(single_tied))


def test_sharded_edges_on_two_gloo_ranks(two_ranks: TwoRanks) -> None:
    out = two_ranks(Path(__file__))
    assert "rank 0 ok" in out and "rank 1 ok" in out, out


if __name__ == "__main__":
    try:
        rank_main()
    except BaseException:
        traceback.print_exc()
        exit_without_finalizing(1)
    exit_without_finalizing(0)
