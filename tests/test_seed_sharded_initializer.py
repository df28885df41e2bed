"""``seed=`` on FSDP2-sharded layers runs a registered initializer once per layer, and
each rank holds the slice of the single-process seeded values (rank 0 of a fake
two-rank group: no collective runs during materialize)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

import deferinit as di
from deferinit import nn as dnn


@pytest.fixture
def rank_zero_of_two() -> Iterator[None]:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model(calls: list[str]) -> nn.Sequential:
    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            calls.append(type(module).__name__)
            nn.init.normal_(module.weight, std=0.02)

    model = di.build(nn.Sequential(dnn.Linear(8), nn.ReLU(), dnn.Linear(6)), (2, 4), device="meta")
    di.initialize(model, init)
    return model


def test_seed_runs_a_registered_initializer_once_per_sharded_layer(
    rank_zero_of_two: None,
) -> None:
    calls: list[str] = []
    whole = di.materialize(_model(calls), seed=3)
    assert calls == ["Linear", "Linear"]
    calls.clear()
    sharded = _model(calls)
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer)
    di.materialize(sharded, device="cpu", seed=3)
    assert calls == ["Linear", "Linear"]  # once per layer, not once per tensor
    for (name, got), want in zip(
        sharded.state_dict().items(), whole.state_dict().values(), strict=True
    ):
        assert isinstance(got, DTensor), name
        rows = want.shape[0] // 2  # Shard(0) over two ranks: rank 0 holds the first half
        assert torch.equal(got.to_local(), want[:rows]), name
