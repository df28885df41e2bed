"""``import deferinit`` loads no heavy torch machinery (issue 11: it costs almost
nothing over ``import torch``).

Each test imports deferinit in a fresh interpreter and names the torch modules it
must not have loaded: the compiler stack (``torch._dynamo``, ``torch._inductor``,
about a second and 70 MiB) is imported by torch itself once a model is compiled,
and deferinit only needs it then. What is measured here is behaviour (which modules
are loaded), never time; ``benchmarks/import_overhead.py`` measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A module that `import torch` alone loads is not deferinit's doing: such a check skips.
COMPILER = ("torch._dynamo", "torch._inductor")
# The DTensor stack pulls in sympy and torch.fx's symbolic shapes (about 0.6 s).
DISTRIBUTED = ("torch.distributed.tensor", "sympy")

CHILD = """
import json, sys
import torch
before = set(sys.modules)
import deferinit
import deferinit.nn
print(json.dumps({"torch": sorted(before), "deferinit": sorted(set(sys.modules) - before)}))
"""


def _loaded() -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return loaded


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    return _loaded()


def _heavy_loaded_by_deferinit(loaded: dict[str, list[str]], heavy: tuple[str, ...]) -> list[str]:
    if set(heavy) & set(loaded["torch"]):
        pytest.skip(f"this torch loads {', '.join(heavy)} itself: deferinit adds nothing")
    below = tuple(f"{h}." for h in heavy)
    return [m for m in loaded["deferinit"] if m in heavy or m.startswith(below)]


def test_import_deferinit_does_not_load_the_compiler(loaded: dict[str, list[str]]) -> None:
    assert _heavy_loaded_by_deferinit(loaded, COMPILER) == []


def test_import_deferinit_does_not_load_the_dtensor_stack(loaded: dict[str, list[str]]) -> None:
    assert _heavy_loaded_by_deferinit(loaded, DISTRIBUTED) == []
