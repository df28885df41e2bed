"""A first call that builds a layer and then fails in one thread never lets another
thread compute with the tensors it takes back (DESIGN §3.5, §3.6): a call from
another thread meanwhile waits for the first call to end, then runs on the layer
as that left it (built once, or deferred again and built by the waiting call)."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

import deferinit as di


class Fails(nn.Module):
    """Fails in thread "A" only, after giving thread "B" time to call it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name == "A":
            time.sleep(0.2)
            raise ValueError("A fails")
        out: torch.Tensor = self.proj(x)
        return out


LazyFails = di.defer(Fails, dim=di.dim(-1))


def test_another_threads_call_during_a_failing_first_call_uses_the_layer_it_leaves() -> None:
    net = nn.Sequential(LazyFails())
    x = torch.randn(4, 3)
    results: dict[str, object] = {}
    started = threading.Event()

    def run() -> None:
        name = threading.current_thread().name
        if name == "B":
            started.wait()
            time.sleep(0.05)  # A is inside its first forward now
        else:
            started.set()
        try:
            results[name] = net(x)
        except Exception as error:  # noqa: BLE001 - kept to look at
            results[name] = error

    threads = [threading.Thread(target=run, name=n) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["A"], di.DeferredInitError)
    out_b = results["B"]
    assert isinstance(out_b, torch.Tensor)
    assert di.pending(net) == []  # built once, by B, after A's build was taken back
    assert torch.equal(out_b, net(x))  # B's output came from the layer as it stands
