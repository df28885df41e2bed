"""What ``import deferinit`` costs on top of ``import torch`` (issue 11: <= 0.1 s, <= 10 MiB).

Each sample is a fresh interpreter that imports torch, reads its resident set
(``/proc/self/status`` VmRSS), times ``import deferinit`` and reads the resident
set again: both sides of the difference come from the same process, so no
subtraction across noisy runs. ``import torch``'s own time is printed for scale.
Median over samples.

As an installed package is, deferinit is imported from cached bytecode, as torch
is: the samples run with ``PYTHONDONTWRITEBYTECODE`` unset, after one untimed
interpreter that writes the cache (``__pycache__``, ignored by git). Otherwise a
development checkout would compile every module from source at each import.

Run: ``.venv/bin/python benchmarks/import_overhead.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

BAR_SECONDS, BAR_MIB = 0.1, 10.0

# Runs in the child; nothing but the standard library is imported before torch.
CHILD = """
import json, time

def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
before = rss()
start = time.perf_counter()
import deferinit
seconds = time.perf_counter() - start
print(json.dumps({"torch_s": torch_s, "seconds": seconds, "mib": rss() - before}))
"""


def sample() -> dict[str, float]:
    """One fresh interpreter: torch's import seconds, deferinit's seconds and MiB."""
    command = [sys.executable, "-W", "ignore", "-c", CHILD]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the import child failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def measure(*, reps: int = 7) -> dict[str, float]:
    """Median of each figure over ``reps`` fresh interpreters (after one that
    writes the bytecode cache)."""
    sample()
    samples = [sample() for _ in range(reps)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="fresh interpreters (median)")
    parser.add_argument("--quick", action="store_true", help="one sample")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else args.reps
    m = measure(reps=reps)
    print(f"import deferinit after import torch, median of {reps} fresh interpreters")
    print(f"import torch: {m['torch_s']:.3f} s")
    print(f"ratio seconds / bar: {m['seconds'] / BAR_SECONDS:.2f}  ({m['seconds']:.3f} s)")
    print(f"ratio MiB / bar: {m['mib'] / BAR_MIB:.2f}  ({m['mib']:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
