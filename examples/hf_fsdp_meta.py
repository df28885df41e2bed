"""A Hugging Face model recorded on meta, sharded with FSDP2, materialized per rank.

Run with two CPU processes (gloo)::

    python -m torch.distributed.run --nproc_per_node 2 examples/hf_fsdp_meta.py

``di.deferred_init(LlamaForCausalLM, config)`` runs the library's own construction
without allocating or drawing anything and records it. Every decoder layer and
the root are then ``fully_shard``-ed (FSDP2, ``Shard(0)``) while still on meta, and
``di.materialize`` replays the construction on each rank in program order, keeping
only that rank's slice of each tensor as soon as it is complete: each rank holds
exactly its slice of ``LlamaForCausalLM(config)`` built eagerly under the same
seed, the tied embedding stays tied, and a training step runs.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import deferinit as di


def config() -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415 - an optional dependency

    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def main() -> int:
    warnings.filterwarnings("ignore")  # transformers' and torch's notices, per rank
    from transformers import LlamaForCausalLM  # noqa: PLC0415 - an optional dependency

    dist.init_process_group("gloo")
    try:
        ok = run(LlamaForCausalLM, dist.get_rank(), dist.get_world_size())
        dist.barrier()
    except Exception:
        traceback.print_exc()
        ok = False
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


def run(factory: Any, rank: int, world: int) -> bool:
    torch.manual_seed(0)
    start = time.perf_counter()
    eager = factory(config())  # the single-process reference
    eager_s = time.perf_counter() - start

    model = di.deferred_init(factory, config())  # nothing allocated, nothing drawn
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    torch.manual_seed(0)
    start = time.perf_counter()
    di.materialize(model)
    rank_s = time.perf_counter() - start

    want = dict(eager.named_parameters())
    equal = True
    held = full = 0
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor), name
        local = p.to_local()
        held += local.numel()
        full += p.numel()
        equal &= torch.equal(p.full_tensor(), want[name])
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = all(p.grad is not None for p in model.parameters())
    if rank == 0:
        print(f"world size: {world}")
        print(f"equal to eager construction: {equal}")
        print(f"tied embedding kept: {tied}")
        print(f"rank 0 holds {held} of {full} parameter values")
        print(f"training step: {trained}")
        print(f"eager construction {eager_s * 1e3:.1f} ms")
        print(f"this rank's materialize {rank_s * 1e3:.1f} ms")
    return equal and tied and trained


def exit_without_finalizing(code: int) -> NoReturn:
    """End the process without tearing down the interpreter (see fsdp_materialize.py:
    gloo's worker threads can abort a finalizing interpreter now and then)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_finalizing(main())
