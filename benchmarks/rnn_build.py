"""``di.build`` of a model holding a real recurrent layer vs eager construct + forward.

d2l's recurrent language model (``RNNLM``, chapter 9-10): token ids ``(batch,
steps)`` are one-hot encoded, run through a real ``nn.GRU`` (or ``nn.LSTM`` /
``nn.RNN``) and a linear head over the vocabulary: the time machine's character
vocabulary (28), 32 hidden units, a batch of 32 sequences of 32 steps (d2l trains
on batches of 1024, where eager's forward weighs 30 times more and the ratio is
far smaller: ``--batch 1024``).

* ``eager``: construct the model with ``nn.Linear(32, 28)`` as the head and run
  one forward on a batch;
* ``deferinit``: construct it with ``dnn.Linear(28)`` as the head and
  ``di.build(model, batch)`` (the shape-only pass: the real recurrent layer runs
  beside the deferred head without computing anything, on meta copies of its
  weights, its kernel answered from the shapes of its arguments).

CPU, one thread; interleaved rounds, the order alternating; one sample is the mean
of ``reps`` runs; median of the rounds. Bar (docs/design.md §5): deferinit / eager <= 3.
Prints the ratio; exits 0 whether or not the bar is met.

Run: ``.venv/bin/python benchmarks/rnn_build.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import nn

import deferinit as di
from deferinit import nn as dnn

BAR = 3.0
VOCAB, HIDDEN, STEPS = 28, 32, 32
CELLS: dict[str, Callable[[int, int], nn.Module]] = {"GRU": nn.GRU, "LSTM": nn.LSTM, "RNN": nn.RNN}


class RNNLM(nn.Module):
    """d2l's ``RNNLM``: one-hot inputs, a recurrent layer, a linear head per step."""

    def __init__(self, rnn: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.linear = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embs = F.one_hot(tokens.T, VOCAB).type(torch.float32)
        outputs, _ = self.rnn(embs)
        return self.linear(outputs).swapaxes(0, 1)  # type: ignore[no-any-return]


def eager(cell: str, tokens: torch.Tensor) -> None:
    RNNLM(CELLS[cell](VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB))(tokens)


def deferinit(cell: str, tokens: torch.Tensor) -> None:
    di.build(RNNLM(CELLS[cell](VOCAB, HIDDEN), dnn.Linear(VOCAB)), tokens)


def measure(cell: str = "GRU", *, rounds: int, reps: int, batch: int = 32) -> dict[str, float]:
    """Median seconds of one eager construct + forward and of one construct + di.build."""
    tokens = torch.randint(0, VOCAB, (batch, STEPS), generator=torch.Generator().manual_seed(0))
    contenders = {"eager": eager, "deferinit": deferinit}
    for run in contenders.values():  # warm-up: torch's and deferinit's first-call paths
        run(cell, tokens)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name in list(contenders) if r % 2 == 0 else reversed(contenders):
            gc.collect()
            start = time.perf_counter()
            for _ in range(reps):
                contenders[name](cell, tokens)
            samples[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args(argv)
    rounds, reps = (1, 1) if args.quick else (args.rounds, args.reps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {
            cell: measure(cell, rounds=rounds, reps=reps, batch=args.batch) for cell in CELLS
        }
    finally:
        torch.set_num_threads(threads)
    print(f"d2l RNNLM, vocab {VOCAB}, {HIDDEN} hidden, batch {args.batch} x {STEPS}, 1 thread")
    for cell, m in results.items():
        ratio = m["deferinit"] / m["eager"]
        verdict = "met" if ratio <= BAR else "missed"
        print(
            f"ratio {cell} di.build / eager construct + forward: {ratio:.2f}  "
            f"(bar <= {BAR}: {verdict}; eager {m['eager'] * 1e3:.1f} ms, "
            f"deferinit {m['deferinit'] * 1e3:.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
