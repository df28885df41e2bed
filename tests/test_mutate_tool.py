"""The mutation tool's own logic (tools/mutate.py), on a toy project: a mutant is
applied once and undone, a snippet that moved is stale, a failing test kills, a
passing run survives, and a kill by a test that fails anyway is not confirmed.
The real mutation set runs with ``make mutate``, not here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deferinit_mutate", ROOT / "tools" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mutate = _load()

TOY = """def add(a, b):
    return a + b


def untested(a):
    return a * 2
"""


def _toy(tmp_path: Path) -> Path:
    package = tmp_path / "src" / "deferinit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_toy.py").write_text(TOY)
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_toy.py").write_text(
        "from deferinit._toy import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    )
    (tests / "test_broken.py").write_text("def test_always_fails():\n    assert False\n")
    return tmp_path


def _mutant(original: str, replacement: str, *tests: str) -> object:
    return mutate.Mutant("toy", "toy promise", "_toy.py", original, replacement, tests)


def test_apply_replaces_the_snippet_found_exactly_once() -> None:
    mutant = _mutant("return a + b", "return a - b")
    assert mutate.apply(TOY, mutant) == TOY.replace("a + b", "a - b")


def test_apply_calls_a_missing_snippet_stale_and_a_repeated_one_ambiguous() -> None:
    with pytest.raises(mutate.StaleError, match="stale: 'return a / b' is not in _toy.py"):
        mutate.apply(TOY, _mutant("return a / b", "return 0"))
    with pytest.raises(mutate.StaleError, match="ambiguous: 'return a' occurs 2 times"):
        mutate.apply(TOY, _mutant("return a", "return 0"))


def test_mutation_table_covers_every_core_promise_with_existing_files() -> None:
    mutants = mutate.MUTANTS
    assert len(mutants) >= 12
    assert len({m.name for m in mutants}) == len(mutants)
    promises = " ".join(m.promise for m in mutants)
    for area in (
        "guard",
        "naming",
        "build order",
        "initializers",
        "reset",
        "checkpoint checks",
        "dtype",
        "seeds",
        "rollback",
        "pending",
        "summary",
    ):
        assert f"{area}:" in promises, area
    for m in mutants:
        assert (ROOT / "src" / "deferinit" / m.file).is_file(), m.name
        assert m.original != m.replacement, m.name
        for test in m.tests:
            assert (ROOT / test.split("::")[0]).is_file(), (m.name, test)


def test_run_mutant_kills_survives_and_puts_the_file_back(tmp_path: Path) -> None:
    tree = _toy(tmp_path)
    mutate.check_imports_copy(tree)  # the copy is what the tests import
    killed = mutate.run_mutant(tree, _mutant("a + b", "a - b", "tests/test_toy.py"), 60)
    assert (killed.status, killed.by) == ("killed", "tests/test_toy.py::test_add")
    survived = mutate.run_mutant(tree, _mutant("a * 2", "a * 3", "tests/test_toy.py"), 60)
    assert survived.status == "survived"
    stale = mutate.run_mutant(tree, _mutant("a ** b", "a", "tests/test_toy.py"), 60)
    assert stale.status == "stale"
    assert (tree / "src" / "deferinit" / "_toy.py").read_text() == TOY
    mutate.confirm(tree, [killed, survived, stale], 60)  # the killing test passes unmutated
    assert killed.confirmed
    assert "kill ratio: 1/3 (33%)" in mutate.table([killed, survived, stale])


def test_a_kill_by_a_test_that_fails_unmutated_is_not_confirmed(tmp_path: Path) -> None:
    tree = _toy(tmp_path)
    by_broken = mutate.run_mutant(tree, _mutant("a + b", "a - b", "tests/test_broken.py"), 60)
    assert (by_broken.status, by_broken.by) == ("killed", "tests/test_broken.py::test_always_fails")
    mutate.confirm(tree, [by_broken], 60)
    assert not by_broken.confirmed
    assert "UNCONFIRMED" in mutate.table([by_broken])
    assert "kill ratio: 0/1 (0%)" in mutate.table([by_broken])
