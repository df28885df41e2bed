"""Sharded materialization under FSDP2: each rank allocates only its own shard.

Run with two CPU processes (gloo)::

    python -m torch.distributed.run --nproc_per_node 2 examples/fsdp_materialize.py

The model is built on meta (no memory), sharded with ``fully_shard``, then
``di.materialize`` fills each rank's shard with the matching slice of the
single-process initialization under the same seed: each rank initializes one
full tensor at a time and keeps its slice. A training step follows.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import deferinit as di
from deferinit import nn as dnn


def make() -> nn.Sequential:
    with torch.device("meta"):
        declared = nn.Linear(64, 48)  # a plain layer declared on meta, sizes written out
    return nn.Sequential(
        dnn.Linear(64),
        nn.ReLU(),
        dnn.LayerNorm(),
        # One deferred layer holding several parameters (attention, two linears, norms).
        dnn.TransformerEncoderLayer(nhead=4, dim_feedforward=96, dropout=0.0),
        declared,
        nn.ReLU(),
        dnn.Linear(10),
    )


def main() -> int:
    dist.init_process_group("gloo")
    try:
        ok = run(dist.get_rank(), dist.get_world_size())
        dist.barrier()  # both ranks are past every collective before either tears down
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def exit_without_finalizing(code: int) -> NoReturn:
    """End the process without tearing down the interpreter.

    destroy_process_group cannot stop the gloo group's worker threads here: DTensor's
    sharding caches keep the device mesh, hence the group, alive. A worker that drops
    the last reference to a finished collective's tensor must take the GIL; once the
    interpreter is finalizing, taking it ends the thread inside a noexcept destructor,
    and the process aborts ("terminate called without an active exception", now and
    then). Leaving with os._exit never finalizes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(rank: int, world: int) -> bool:
    # The Linear declared on meta in make() has no init code beyond its own
    # reset_parameters, so that gives eager's values: di.materialize's warning that
    # nothing else of its construction is replayed does not apply here.
    warnings.filterwarnings("ignore", category=di.UnrecordedInitWarning)
    example = (4, 32)

    torch.manual_seed(0)
    reference = di.materialize(di.build(make(), example, device="meta"))

    torch.manual_seed(0)
    model = di.build(make(), example, device="meta")
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    start = time.perf_counter()
    di.materialize(model, device="cpu")
    elapsed = time.perf_counter() - start

    params = dict(model.named_parameters())
    sharded = all(isinstance(p, DTensor) for p in params.values())
    local = sum(p.to_local().numel() for p in params.values() if isinstance(p, DTensor))
    full = sum(p.numel() for p in reference.parameters())
    equal = all(
        torch.equal(params[name].full_tensor(), value)  # type: ignore[attr-defined]
        for name, value in reference.named_parameters()
    )

    # seed= mode: every parameter draws from a generator seeded by the seed and its name,
    # so no rank replays the other parameters' draws, and world size is irrelevant.
    seeded_reference = di.materialize(di.build(make(), example, device="meta"), seed=7)
    seeded = di.build(make(), example, device="meta")
    for layer in seeded:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(seeded)
    torch.manual_seed(1000 + rank)  # the global generator plays no part
    di.materialize(seeded, device="cpu", seed=7)
    seeded_params = dict(seeded.named_parameters())
    seeded_equal = all(
        torch.equal(seeded_params[name].full_tensor(), value)  # type: ignore[attr-defined]
        for name, value in seeded_reference.named_parameters()
    )

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 32)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    trained = bool(torch.isfinite(loss.detach()))

    if rank == 0:
        print(f"world size: {world}")
        print(f"sharded: {sharded}")
        print(f"rank 0 holds {local} of {full} parameters")
        print(f"equal to single process: {equal}")
        print(f"seed mode equal to single process: {seeded_equal}")
        print(f"training step: {trained}")
        print(f"materialize: {elapsed * 1000:.1f} ms")
    return sharded and equal and seeded_equal and trained and local < full


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_without_finalizing(code)
