"""DistributedDataParallel (docs/design.md §3.9): DDP works on a built model; on an unbuilt
one it refuses before any communication.

Two processes with the gloo backend on CPU. This file is also the script that runs
them: the test starts ``python tests/test_ddp.py OUT`` in a subprocess (with
``-W error``, which the spawned ranks inherit), whose ``main`` spawns the two ranks;
each rank saves what it saw to ``OUT/rank<N>.pt`` and the test compares them. A
subprocess, not ``mp.spawn`` from the test session: the ranks must import this
module by path, and a hung collective is cut off by the subprocess timeout (each
rank also has a 20 s process-group timeout) instead of hanging the test session.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

import deferinit as di
from deferinit import nn as dnn

WORLD_SIZE = 2
BATCH, FEATURES, OUTPUTS = 4, 6, 3  # per rank
LR = 0.1
MATERIALIZE_SEED = 1234

State = dict[str, torch.Tensor]


def deferred_model() -> nn.Module:
    return nn.Sequential(dnn.Linear(8), nn.Tanh(), dnn.Linear(OUTPUTS))


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's (inputs, targets): different per rank, the same on every run."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randn(BATCH, OUTPUTS, generator=g)


def snapshot(module: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- what each rank runs ------------------------------------------------------------------


def rank_main(rank: int, world_size: int, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(out) / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        # DDP's objects are gone when run_checks returns: destroying the process
        # group while a DDP wrapper still holds it can hang the process at exit.
        result = run_checks(rank)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_checks(rank: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if rank == 0:
        # Rank 0 alone: had DDP started a collective before its check, this would
        # wait for rank 1 and time out, and rank 1's own DDP below would mismatch.
        try:
            DistributedDataParallel(deferred_model())
            result["unbuilt_error"] = None
        except RuntimeError as error:
            result["unbuilt_error"] = f"{type(error).__name__}: {error}"

    torch.manual_seed(rank)  # different initial values per rank: DDP broadcasts rank 0's
    model = di.build(deferred_model(), (BATCH, FEATURES))
    result["initial"] = snapshot(model)
    ddp = DistributedDataParallel(model)
    result["synced"] = snapshot(model)

    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    x, y = rank_batch(rank)
    loss = F.mse_loss(ddp(x), y)
    loss.backward()
    optimizer.step()
    result["trained"] = snapshot(model)
    result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Built on meta and materialized with seed=: every rank gets the same values
    # without any broadcast, whatever its global RNG state.
    meta = di.build(deferred_model(), (BATCH, FEATURES), device="meta")
    di.materialize(meta, seed=MATERIALIZE_SEED)
    result["materialized"] = snapshot(meta)
    DistributedDataParallel(meta)(x).sum().backward()
    result["materialized_ddp_ran"] = True

    return result


def main(argv: list[str]) -> int:
    (out,) = argv
    spawn(rank_main, args=(WORLD_SIZE, out), nprocs=WORLD_SIZE, join=True)
    return 0


# --- the test -------------------------------------------------------------------------


def run_ranks(out: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-W", "error", __file__, str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def single_process_step(initial: State) -> State:
    """One SGD step on both ranks' batches together: what DDP's averaged gradients give."""
    model = di.build(deferred_model(), (BATCH, FEATURES))
    model.load_state_dict(initial)
    xs, ys = zip(*(rank_batch(r) for r in range(WORLD_SIZE)), strict=True)
    F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return snapshot(model)


def test_ddp_on_two_gloo_ranks(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(tmp_path)

    # Unbuilt: torch's own check of UninitializedParameter refuses, before communicating.
    message = rank0["unbuilt_error"]
    assert message is not None, "DDP accepted a model whose parameters are uninitialized"
    assert message.startswith("RuntimeError: Modules with uninitialized parameters"), message
    assert "can't be used with `DistributedDataParallel`" in message, message
    assert "forward pass" in message, message  # the fix: build (torch says: a dummy forward)

    # Built: DDP broadcast rank 0's initial values to rank 1.
    assert any(
        not torch.equal(rank0["initial"][k], rank1["initial"][k]) for k in rank0["initial"]
    ), "the ranks were seeded differently, their initial values should differ"
    for rank in (rank0, rank1):
        for key, value in rank0["initial"].items():
            assert torch.equal(rank["synced"][key], value), key

    # One training step: gradients all-reduced, parameters equal across ranks, bitwise,
    # and equal to one step of a single process on both batches together.
    want = single_process_step(rank0["initial"])
    for key in rank0["trained"]:
        assert torch.equal(rank0["trained"][key], rank1["trained"][key]), key
        assert torch.equal(rank0["grads"][key], rank1["grads"][key]), key
        assert not torch.equal(rank0["trained"][key], rank0["initial"][key]), key
        torch.testing.assert_close(rank0["trained"][key], want[key], rtol=1e-6, atol=1e-6)

    # Meta build + materialize(seed=): the same values on every rank, then DDP runs.
    for key, value in rank0["materialized"].items():
        assert torch.equal(rank1["materialized"][key], value), key
    assert rank0["materialized_ddp_ran"] and rank1["materialized_ddp_ran"]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
