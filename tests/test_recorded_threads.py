"""Recording and replaying never set the process-wide generator on another thread's
behalf (DESIGN §3.6): a draw another thread makes while a factory is recorded (or
recorded again at ``di.materialize``) is that thread's, not a reseed to replay, and
is never undone."""

from __future__ import annotations

import threading

import torch
from torch import nn

import deferinit as di


def test_another_threads_draw_during_recording_is_not_replayed_as_a_reseed() -> None:
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        go.wait()
        torch.rand(5)
        done.set()

    def factory() -> nn.Module:
        first = nn.Linear(8, 8)
        go.set()
        done.wait()  # the other thread draws while this one records
        return nn.Sequential(first, nn.Linear(8, 8))

    worker = threading.Thread(target=other)
    worker.start()
    torch.manual_seed(0)
    model = di.deferred_init(factory)
    worker.join()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    torch.manual_seed(0)
    di.materialize(model)
    pairs = zip(model.parameters(), eager.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_recording_again_never_hands_out_a_stream_twice() -> None:
    runs, drawn = [0], []
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        go.wait()
        drawn.append(torch.rand(3))
        done.set()

    def factory() -> nn.Module:
        runs[0] += 1
        layer = nn.Linear(16, 16)
        nn.init.trunc_normal_(layer.weight)  # a value read steered by random numbers
        if runs[0] == 2:  # recorded again inside di.materialize: the other thread draws
            go.set()
            done.wait()
        return layer

    worker = threading.Thread(target=other)
    worker.start()
    torch.manual_seed(5)
    model = di.deferred_init(factory)
    torch.manual_seed(0)
    di.materialize(model)
    worker.join()
    torch.manual_seed(0)
    first = torch.rand(3)
    torch.manual_seed(0)
    eager = nn.Linear(16, 16)
    nn.init.trunc_normal_(eager.weight)
    # Either the other thread drew seed 0's first numbers or the model did, not both.
    assert isinstance(model, nn.Linear)
    assert not (torch.equal(drawn[0], first) and torch.equal(model.weight, eager.weight))
