"""DistributedDataParallel on a deferred model: build from a shape, wrap, train.

Two CPU processes with the gloo backend, started by this script itself::

    python examples/ddp_train.py                 # 2 ranks, 1 step
    python examples/ddp_train.py --world-size 3 --steps 5

Every rank writes the model without input sizes and builds it with ``di.build``
from the shape of a batch alone; the built model is an ordinary ``torch.nn``
model, so ``DistributedDataParallel`` wraps it as it is (it broadcasts rank 0's
initial values; the ranks were seeded differently to show it). Each rank then
trains on its own shard of a synthetic regression set; gradients are averaged
across ranks, so after every step all ranks hold the same parameters. DDP refuses
a model that is not built yet (its parameters are uninitialized): build first.

Rank 0 prints the check lines; the script exits with status 0 only if every
check held on every rank.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

import deferinit as di
from deferinit import nn as dnn

BATCH, FEATURES, OUTPUTS = 16, 20, 4  # per rank


def make_model() -> nn.Module:
    """An MLP without input sizes: 20 features in (inferred), 4 out."""
    return nn.Sequential(dnn.Linear(32), dnn.LayerNorm(), nn.ReLU(), dnn.Linear(OUTPUTS))


def shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch for this step, from a fixed linear target plus noise."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, FEATURES, generator=g)
    w = torch.linspace(-1, 1, FEATURES * OUTPUTS).reshape(FEATURES, OUTPUTS)
    return x, x @ w + 0.1 * torch.randn(BATCH, OUTPUTS, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(vector: torch.Tensor) -> bool:
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def rank_main(rank: int, world_size: int, rendezvous: str, steps: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        # DDP's objects are gone when train returns: destroying the process group
        # while a DDP wrapper still holds it can hang this process at exit (gloo).
        passed = train(rank, world_size, steps)
    finally:
        dist.destroy_process_group()
    if not passed:
        raise RuntimeError(f"rank {rank}: a DDP check failed")
    # Leave without finalizing the interpreter: gloo's worker threads, still alive
    # through DTensor's and DDP's caches, can abort a finalizing interpreter now and
    # then ("terminate called without an active exception"; see fsdp_materialize.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(rank: int, world_size: int, steps: int) -> bool:
    """Build from a shape, wrap in DDP, train; whether every check held."""
    say = print if rank == 0 else (lambda *_: None)
    torch.manual_seed(rank)  # deliberately different per rank: DDP syncs rank 0's values
    model = di.build(make_model(), (BATCH, FEATURES))  # a shape, no data
    say(model)
    say(f"world size: {world_size} (gloo, CPU)")
    say(f"built from shape {(BATCH, FEATURES)}: {di.is_built(model)}")
    before_ddp = same_on_all_ranks(flat(model))

    ddp = DistributedDataParallel(model)
    initial = flat(model)
    synced = same_on_all_ranks(initial)
    say(f"initial parameters differ across ranks before DDP: {not before_ddp}")
    say(f"initial parameters equal across ranks after DDP: {synced}")

    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(1, steps + 1):
        x, y = shard(rank, step)
        optimizer.zero_grad()
        loss = F.mse_loss(ddp(x), y)
        loss.backward()  # all-reduces (averages) the gradients across ranks
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        say(f"step {step}: loss {mean_loss.item() / world_size:.4f} (mean over ranks)")

    trained = flat(model)
    equal = same_on_all_ranks(trained)
    changed = not torch.equal(trained, initial)
    say(f"parameters equal across ranks: {equal}")
    say(f"parameters changed by training: {changed}")
    return di.is_built(model) and not before_ddp and synced and equal and changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    # The ranks meet through a file (no port to find free); a failing rank raises
    # here (torch.multiprocessing.ProcessRaisedException).
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        spawn(rank_main, args=(args.world_size, rendezvous, args.steps), nprocs=args.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
