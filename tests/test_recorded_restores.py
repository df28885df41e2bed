"""A construction that puts the default generator back to a state it held before
(``torch.random.fork_rng`` around a reseed) replays the restore as "what the generator
held at that point of the replay", so the draws after it are eager's whatever the seed
at deferred_init."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from test_record_support import assert_replays_as_eager


class Forked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


class DrawsThenForked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Linear(4, 4)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.a = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        with torch.random.fork_rng():
            torch.manual_seed(2)
            self.inner = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        nn.init.trunc_normal_(self.b.weight)  # simulated through the restores


class SaveAndRestore(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        saved = torch.get_rng_state()
        torch.manual_seed(3)
        self.a = nn.Linear(4, 4)
        torch.set_rng_state(saved)
        self.b = nn.Linear(4, 4)


FACTORIES: list[Callable[[], nn.Module]] = [Forked, DrawsThenForked, SaveAndRestore]


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(("recorded_under", "materialized_under"), [(0, 0), (5, 0), (0, 4)])
def test_a_restore_replays_the_state_of_the_replay(
    factory: Callable[[], nn.Module], recorded_under: int, materialized_under: int
) -> None:
    assert_replays_as_eager(factory, recorded_under, materialized_under)
