"""What ``di.deferred_init`` costs (issue 10; docs/design.md §5).

* ``hf_record_materialize_ratio_vs_eager``: a Hugging Face ``LlamaForCausalLM``
  (hidden 512, 4 layers, vocabulary 8,000, tied embeddings): ``di.deferred_init`` +
  ``di.materialize`` over eager construction ``LlamaForCausalLM(config)``, CPU, one
  thread, interleaved rounds (the order alternating), ratio of medians. The values
  are bitwise equal (checked once).
* ``record_70b_s`` and ``record_70b_peak_rss_mib``: ``di.deferred_init`` of the
  70B-shaped decoder written with plain ``torch.nn`` layers and explicit sizes
  (``tests/test_record_support.py``'s ``Llama70B``), in a fresh interpreter; peak RSS
  of that whole process (torch's import included). Bars: < 10 s, < 1 GiB.
* ``record_bytes_per_op``: the record's memory per recorded operation.

Run: ``.venv/bin/python benchmarks/record_cost.py`` (``--quick``: fewer rounds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import deferinit as di

TESTS = Path(__file__).resolve().parent.parent / "tests"


def config() -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415 - an optional dependency

    return LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )


def hf_ratio(rounds: int) -> float:
    from transformers import LlamaForCausalLM  # noqa: PLC0415 - an optional dependency

    cfg = config()

    def eager() -> Any:
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    def recorded() -> Any:
        model = di.deferred_init(LlamaForCausalLM, cfg)
        torch.manual_seed(0)
        return di.materialize(model)

    a, b = eager(), recorded()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    times: dict[str, list[float]] = {"eager": [], "recorded": []}
    for r in range(rounds):
        order = (("eager", eager), ("recorded", recorded))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["recorded"]) / statistics.median(times["eager"])


def record_70b() -> dict[str, float]:
    code = "import test_record_support as s; s.record_70b()"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        cwd=TESTS,
        timeout=300,
        check=True,
    ).stdout

    def number(pattern: str) -> float:
        found = re.search(pattern, out)
        assert found is not None, out
        return float(found.group(1))

    return {
        "record_70b_s": number(r"record time: ([\d.]+) s"),
        "record_70b_peak_rss_mib": number(r"peak RSS: (\d+) MiB"),
        "record_bytes_per_op": number(r"= (\d+) B/op"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    figures = {"hf_record_materialize_ratio_vs_eager": hf_ratio(3 if args.quick else args.rounds)}
    figures.update(record_70b())
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
