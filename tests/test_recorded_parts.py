"""``di.materialize`` of a part of a recorded model: without ``seed=`` it is refused
before anything changes (the record replays the whole construction in program order);
with ``seed=`` the part is filled from the record, its own init code included."""

from __future__ import annotations

import warnings
from typing import Any, cast

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit._record import ReplayError
from test_record_support import differing


def zeroed() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    nn.init.zeros_(cast(nn.Linear, m[1]).weight)
    return m


def test_a_part_without_seed_is_refused_and_the_whole_stays_eager() -> None:
    torch.manual_seed(0)
    eager = zeroed()
    rec: Any = di.deferred_init(zeroed)
    state = torch.get_rng_state()
    with (
        warnings.catch_warnings(),
        pytest.raises(
            ReplayError,
            match=r"'1' \(Linear\) is part of a model recorded by di\.deferred_init.*"
            r"Nothing was allocated.*Fix: di\.materialize\(model\) on the recorded model.*"
            r"seed=",
        ),
    ):
        warnings.simplefilter("error")
        di.materialize(rec[1])
    assert all(t.is_meta for t in rec.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    di.materialize(rec)
    assert differing(eager, rec) == []
    di.materialize(rec[1])  # nothing left to fill: nothing to refuse


def test_a_container_holding_a_part_is_refused_too() -> None:
    rec: Any = di.deferred_init(zeroed)
    holder = nn.ModuleList([rec[1]])
    with pytest.raises(ReplayError, match=r"'0' \(Linear\) is part of a model recorded"):
        di.materialize(holder)
    assert rec[1].weight.is_meta


def test_a_part_with_seed_keeps_the_recorded_init_code() -> None:
    def alone() -> nn.Linear:
        m = nn.Linear(8, 2)
        nn.init.zeros_(m.weight)
        return m

    rec: Any = di.deferred_init(zeroed)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        di.materialize(rec[1], seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(rec[1].weight, torch.zeros(2, 8))
    assert rec[0].weight.is_meta
    single: Any = di.materialize(di.deferred_init(alone), seed=3)
    assert differing(single, rec[1]) == []
    di.materialize(rec, seed=3)
    assert not rec[0].weight.is_meta and torch.equal(rec[1].weight, torch.zeros(2, 8))
    whole: Any = di.materialize(di.deferred_init(zeroed), seed=3)
    assert differing(whole[0], rec[0]) == []
