"""A recorded construction that sets the default generator back to a state it read
(``s = torch.get_rng_state(); ...; torch.set_rng_state(s)``, ``torch.random.fork_rng``
around draws) is replayed as eager's: the recording draws nothing, so it sees the
rewind as it happens, and each read as the point it goes back to. A state it did
not read that way cannot be told from no change: refused, never replayed wrong."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import deferinit as di
from deferinit._record import RecordError


class SameInit(nn.Module):
    """Two layers with equal initial weights: the generator rewound between them."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        state = torch.get_rng_state()
        self.a = nn.Linear(3, 3)
        torch.set_rng_state(state)
        self.b = nn.Linear(3, 3)
        with torch.random.fork_rng():
            self.noise = nn.Parameter(torch.randn(4))
        self.c = nn.Linear(3, 3)


@pytest.mark.parametrize("seed", [None, 7], ids=["start", "after a seed"])
@pytest.mark.parametrize("at_record", [0, 5], ids=["same seed", "other seed"])
def test_rewinds_replay_as_eager(seed: int | None, at_record: int) -> None:
    torch.manual_seed(0)
    eager = SameInit(seed)
    after = torch.get_rng_state()
    torch.manual_seed(at_record)
    model = di.deferred_init(SameInit, seed)
    torch.manual_seed(0)
    di.materialize(model)
    ours_all, theirs_all = model.state_dict(), eager.state_dict()
    for (name, ours), theirs in zip(ours_all.items(), theirs_all.values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(model.a.weight, model.b.weight)
    assert torch.equal(torch.get_rng_state(), after)


class ReadLate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        with torch.random.fork_rng():  # read after a's draws, and again inside
            self.noise = nn.Parameter(torch.randn(4))
            state = torch.get_rng_state()
            self.c = nn.Linear(3, 3)
            torch.set_rng_state(state)
            self.d = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)


def test_states_read_after_draws_go_back_to_where_they_were_read() -> None:
    torch.manual_seed(0)
    eager = ReadLate()
    after = torch.get_rng_state()
    torch.manual_seed(3)
    model = di.deferred_init(ReadLate)
    torch.manual_seed(0)
    di.materialize(model)
    ours_all, theirs_all = model.state_dict(), eager.state_dict()
    for (name, ours), theirs in zip(ours_all.items(), theirs_all.values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(torch.get_rng_state(), after)


class Unread(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        state = torch.default_generator.get_state()  # not torch.get_rng_state
        self.a = nn.Linear(3, 3)
        torch.set_rng_state(state)
        self.b = nn.Linear(3, 3)


def test_setting_back_a_state_not_read_with_get_rng_state_is_refused() -> None:
    functions = (torch.get_rng_state, torch.set_rng_state)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(RecordError, match=r"sets the random generator back.*Fix"):
        di.deferred_init(Unread)
    assert torch.equal(torch.get_rng_state(), before)
    assert (torch.get_rng_state, torch.set_rng_state) == functions  # torch's own again


def test_recordings_in_two_threads_each_see_their_rewinds_and_torch_is_put_back() -> None:
    functions = (torch.get_rng_state, torch.set_rng_state)
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

    def first() -> nn.Module:
        a_in.set()
        b_in.wait(10)
        return nn.Linear(2, 2)

    def second(wait: bool = True) -> nn.Module:
        if wait:
            b_in.set()
            a_done.wait(10)  # the first recording ends while this one runs
        model = nn.Module()
        model.a = nn.Linear(2, 2)
        with torch.random.fork_rng():
            model.n = nn.Linear(2, 2)
        model.b = nn.Linear(2, 2)
        return model

    made: dict[str, nn.Module] = {}

    def record_second() -> None:
        a_in.wait(10)
        made["second"] = di.deferred_init(second)

    threads = [threading.Thread(target=di.deferred_init, args=(first,))]
    threads.append(threading.Thread(target=record_second))
    for thread in threads:
        thread.start()
    threads[0].join()
    a_done.set()
    threads[1].join()
    assert (torch.get_rng_state, torch.set_rng_state) == functions
    torch.manual_seed(0)
    eager = second(wait=False)
    torch.manual_seed(0)
    di.materialize(made["second"])
    for key, value in eager.state_dict().items():
        assert torch.equal(made["second"].state_dict()[key], value), key


class ClonedBack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        state = torch.get_rng_state().clone()  # computed in the recording: no values
        self.a = nn.Linear(3, 3)
        torch.set_rng_state(state)
        self.b = nn.Linear(3, 3)


def test_setting_a_state_computed_in_the_recording_is_refused() -> None:
    with pytest.raises(RecordError, match=r"computed while recorded.*Fix"):
        di.deferred_init(ClonedBack)
