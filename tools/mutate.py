"""``make mutate``: a scripted mutation run over deferinit's core promises.

Each mutant is one plausible bug: an exact snippet of a source file and what it is
replaced with, plus the test files that should catch it. Every mutant is applied,
one at a time, to a *copy* of the repository (the working tree is never touched,
so it is safe while the code is being edited), and the named tests are run there
with ``pytest -x``, the copy's ``src`` first on ``PYTHONPATH`` (subprocesses the
tests start inherit it). A failing run kills the mutant; a passing one lets it
survive. The first test that failed is then run on the unmutated copy: a test
that fails there too proves nothing, and the run says so.

A snippet that is no longer in its file is *stale* (the code moved); a snippet
found more than once is *ambiguous*. Both fail the run, so the table stays true:
refresh the snippet rather than drop the mutant.

Usage::

    python tools/mutate.py                 # every mutant; exit 0 only if all are killed
    python tools/mutate.py --list          # the table, without running anything
    python tools/mutate.py guard-compare seed-same-stream   # some mutants, by name
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path("src/deferinit")
# Copied into the scratch tree: what the tests read (examples, benchmarks, pyproject's
# pytest settings), never the virtual environment or caches.
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".hypothesis", "*.egg-info", "build", "dist", ".coverage*", "htmlcov",
)  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    """One plausible bug: ``original`` (exact, found once in ``file``) becomes
    ``replacement``; ``tests`` (paths or node ids below the root) should fail."""

    name: str
    promise: str
    file: str  # below src/deferinit
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "guard-compare",
        "guard: a changed inferred size is reported",
        "_become/_guard.py",
        "if now != state.values[name]:",
        "if now == state.values[name]:",
        ("tests/test_core.py", "tests/test_errors.py", "tests/test_guard.py"),
    ),
    Mutant(
        "guard-input-fast-path",
        "guard: the one-input fast path explains mismatches too",
        "_become/_guard.py",
        "_explain(module, (input,), {}, error)",
        "None",
        ("tests/test_core.py", "tests/test_errors.py"),
    ),
    Mutant(
        "naming-first-of-class",
        "naming: an error names the failing layer, not the first of its class",
        "_naming.py",
        "name = names_by_id(candidate).get(id(module))",
        "name = next((n for n, s in candidate.named_modules() if type(s) is type(module)), None)",
        ("tests/test_core.py", "tests/test_errors.py"),
    ),
    Mutant(
        "build-execution-order",
        "build order: di.build constructs in eager's order, not in another",
        "_shape/_build.py",
        "for name, sub in top.named_modules(prefix=prefix):",
        "for name, sub in reversed(list(top.named_modules(prefix=prefix))):",
        ("tests/test_build.py",),
    ),
    Mutant(
        "build-skips-initializers",
        "initializers: di.build runs the registered initializers",
        "_shape/_build.py",
        "run_registered(layer)",
        "None",
        ("tests/test_build.py", "tests/test_initialize.py"),
    ),
    Mutant(
        "initializer-first-pattern-wins",
        "initializers: each parameter takes the last glob it matches",
        "_become/_initialize.py",
        "chosen = fn",
        "chosen = chosen or fn",
        ("tests/test_initialize.py",),
    ),
    Mutant(
        "reset-new-parameter-objects",
        "reset: di.reset keeps the parameter objects",
        "_become/_reset.py",
        "table[leaf] = old",
        "table[leaf] = table[leaf]",
        ("tests/test_reset.py", "tests/test_core.py"),
    ),
    Mutant(
        "reset-keeps-layer-hooks",
        "reset: the layer's own hooks go with its build (no duplicates after a rebuild)",
        "_become/_reset.py",
        "table.pop(k, None)",
        "None",
        ("tests/test_reset.py", "tests/test_own_hooks.py", "tests/test_core.py"),
    ),
    Mutant(
        "dtype-conversion-lost",
        "dtype: conversions before the build reach the built layer, rounding included",
        "_become/_adopt.py",
        "            data = convert_through(data, passed)\n",
        "            pass\n",
        ("tests/test_core.py", "tests/test_become_conversion_chain.py"),
    ),
    Mutant(
        "dtype-declared-default-ignored",
        "dtype: a layer is built in the default dtype in effect at its declaration",
        "_declare/_state.py",
        "if state.dtype is not torch.get_default_dtype():",
        "if False:",
        ("tests/test_grad_modes.py", "tests/test_core.py"),
    ),
    Mutant(
        "first-call-interrupt-half-built",
        "rollback: Ctrl-C inside an initializer at the first call leaves the layer deferred",
        "_become/_become.py",
        "own_hooks)\n        except BaseException:",
        "own_hooks)\n        except Exception:",
        ("tests/test_interrupts.py",),
    ),
    Mutant(
        "rollback-keeps-class",
        "rollback: a failed build gives back the placeholders' class",
        "_become/_transaction.py",
        "tensor.__class__ = cls",
        "None",
        ("tests/test_core.py", "tests/test_build.py", "tests/test_errors.py"),
    ),
    Mutant(
        "build-not-all-or-nothing",
        "rollback: di.build undoes every layer it built when a later one fails",
        "_shape/_build.py",
        "for txn in reversed(done):\n            txn.rollback()",
        "for txn in reversed([]):\n            txn.rollback()",
        ("tests/test_build.py",),
    ),
    Mutant(
        "checkpoint-shape-unchecked",
        "checkpoint checks: a mis-shaped key is refused before anything is written",
        "_checkpoint/_load.py",
        "if tuple(value.shape) != tuple(target.shape):",
        "if False:",
        ("tests/test_load.py",),
    ),
    Mutant(
        "checkpoint-unexpected-ignored",
        "checkpoint checks: strict loading reports unexpected keys",
        "_checkpoint/_load.py",
        "unexpected = _unexpected(module, state)",
        "unexpected: list[str] = []",
        ("tests/test_load.py",),
    ),
    Mutant(
        "seed-same-stream",
        "seeds: seed= gives every tensor its own stream (from its qualified name)",
        "_fill/_materialize.py",
        'digest = hashlib.sha256(f"{seed}:{qualified}".encode()).digest()',
        'digest = hashlib.sha256(f"{seed}".encode()).digest()',
        ("tests/test_materialize.py", "tests/test_each.py"),
    ),
    Mutant(
        "seed-stream-per-layer",
        "seeds: in one run, each tensor of a layer draws from its own generator",
        "_fill/_streams.py",
        "generator.manual_seed(self.seeds(self.names[position]))",
        "generator.manual_seed(self.seeds(min(self.names.values())))",
        ("tests/test_materialize.py", "tests/test_each.py"),
    ),
    Mutant(
        "seed-draws-default-generator",
        "seeds: seed= never draws from the default generator",
        "_random.py",
        'return overload(*args, **{**kwargs, "generator": generator})',
        "return func(*args, **kwargs)",
        ("tests/test_materialize.py", "tests/test_each.py"),
    ),
    Mutant(
        "pending-top-level-only",
        "pending: nested deferred layers are listed by their qualified names",
        "_become/_reset.py",
        "and not _inside_placeholder(module, name)",
        'and "." not in name',
        ("tests/test_core.py", "tests/test_build.py", "tests/test_adversarial_copies.py"),
    ),
    Mutant(
        "summary-trainable-counts-frozen",
        "summary: frozen parameters are not counted as trainable",
        "_present/_summary.py",
        '"trainable": sum(p.numel or 0 for p in known if p.requires_grad),',
        '"trainable": sum(p.numel or 0 for p in known),',
        ("tests/test_summary.py",),
    ),
    Mutant(
        "summary-tie-counted-twice",
        "summary: a tied parameter is counted once",
        "_present/_summary.py",
        "seen.setdefault(info.key, info)",
        "seen.setdefault((id(info), info.name), info)",
        ("tests/test_summary.py",),
    ),
    Mutant(
        "tie-dropped-at-build",
        "ties: a real tensor assigned before the build is the one the built layer holds",
        "_become/_adopt.py",
        "placeholder  # type: ignore[assignment]\n            ties.append(name)",
        "None\n            ties.append(name)",
        ("tests/test_ties.py",),
    ),
    Mutant(
        "identity-lost-to-weak-references",
        "identity: a weakly referenced parameter keeps its object through materialize",
        "_swap.py",
        "torch._C._swap_tensor_impl(a, b)",
        "torch.utils.swap_tensors(a, b)",
        ("tests/test_materialize_identity.py", "tests/test_load.py"),
    ),
    Mutant(
        "waiting-init-dropped",
        "pending init: in-place init on a placeholder runs after the build",
        "_declare/_pending.py",
        "            func(*[fix(a) for a in args], **{k: fix(v) for k, v in kwargs.items()})",
        "            pass",
        ("tests/test_pending_init.py",),
    ),
    Mutant(
        "recorded-twins-after-replay",
        "deferred_init: twins declared in a recording are constructed at their place",
        "_record/_replay.py",
        "                    twins.run(op.event)",
        "                    pass",
        ("tests/test_record_twins.py",),
    ),
    Mutant(
        "recorded-load-overwritten",
        "deferred_init: materialize never overwrites values loaded into a recorded model",
        "_record/_sharded.py",
        "        return Normal(placeholder) if is_meta(placeholder) else None\n    current",
        "        return Normal(placeholder)\n    current",
        ("tests/test_record_twins.py",),
    ),
    Mutant(
        "take-over-looked-at-placeholder",
        "identity: a placeholder once made (looked at) is the built tensor, whoever holds it",
        "_become/_adopt.py",
        "    if not placeholders_made(module):\n        return [], {}",
        "    if True:\n        return [], {}",
        ("tests/test_become_keeps_seen_placeholders.py", "tests/test_take_over.py"),
    ),
    Mutant(
        "checking-guard-dropped",
        "mismatch: a layer holding no tensor compares its sizes before the forward",
        "_become/_become.py",
        "guard_for(module, type(real), sizes_unenforced(real))",
        "guard_for(module, type(real), False)",
        ("tests/test_become_guard_checks_unenforced_sizes.py",),
    ),
    Mutant(
        "known-layout-count",
        "layouts from arguments: BatchNorm's num_batches_tracked exists with running stats",
        "_declare/_layout.py",
        '("num_batches_tracked", False, ("track_running_stats",), True),',
        '("num_batches_tracked", False, ("track_running_stats",), False),',
        ("tests/test_known_layouts.py",),
    ),
    Mutant(
        "late-placeholders-device",
        "placeholders made late: on the device the layer was declared on",
        "_declare/_deferred.py",
        "device = state.device if state.device is not None else _CPU",
        "device = _CPU",
        ("tests/test_placeholders_made_late.py",),
    ),
    Mutant(
        "users-tensors-dropped",
        "tensors a user registered on a twin before its build are kept by the build",
        "_become/_become.py",
        '        new["_parameters"].update(added[2])',
        "        pass",
        ("tests/test_placeholders_made_late.py",),
    ),
    Mutant(
        "declaration-key-types",
        "declarations remembered: equal arguments of another type are not the same",
        "_declare/_deferred.py",
        "return (cls, torch.get_default_dtype(), args, types, tuple(kwargs.items()))",
        "return (cls, torch.get_default_dtype(), args, tuple(kwargs.items()))",
        ("tests/test_declarations_seen_before.py",),
    ),
    Mutant(
        "declaration-shared-state",
        "declarations remembered: each layer holds its own copy of the arguments",
        "_declare/_deferred.py",
        "state = State(cls, dict(arguments), dict(options), dict(explicit))",
        "state = State(cls, arguments, options, explicit)",
        ("tests/test_declarations_seen_before.py",),
    ),
    Mutant(
        "meta-private-reset-ignored",
        "meta: a module with only _reset_parameters (MultiheadAttention) is filled by it",
        "_fill/_layers.py",
        'for name in ("reset_parameters", "_reset_parameters"):',
        'for name in ("reset_parameters",):',
        ("tests/test_meta_declared_attention.py",),
    ),
    Mutant(
        "recorded-reseed-dropped",
        "record: a reseed inside the factory is replayed at its place",
        "_record/_recorder.py",
        "        self._event(Reseed(state, seed if fresh and back is None else None, back))",
        "        pass",
        ("tests/test_recorded_reseeds.py",),
    ),
    Mutant(
        "other-threads-draw-recorded",
        "record: another thread's draw while recording is not replayed as a reseed",
        "_record/_recorder.py",
        "if back is None and not fresh and not any(",
        "if False and not any(",
        ("tests/test_recorded_threads.py",),
    ),
    Mutant(
        "apply-before-build-lost",
        "Module.apply before the build: fn runs on the built layer (d2l's type checks)",
        "_become/_initialize.py",
        "for fn in registered.then:",
        "for fn in ():",
        ("tests/test_apply_before_build.py",),
    ),
    Mutant(
        "seeded-failure-restores-generators",
        "seed= never puts the process-wide generators back (other threads' draws stand)",
        "_fill/_materialize.py",
        "generators = Generators(target) if seed is None else None",
        "generators = Generators(target)",
        ("tests/test_seed_leaves_global_generator_alone.py",),
    ),
    Mutant(
        "first-call-not-held",
        "threads: no other thread computes with a first call's tensors before it succeeded",
        "_become/_become.py",
        "txn = become(module, values, built_from=built_from, hold=True)",
        "txn = become(module, values, built_from=built_from, hold=False)",
        ("tests/test_threads_failed_first_call.py",),
    ),
    Mutant(
        "user-block-unchecked",
        "a di.defer block whose forward accepts a changed size still reports the mismatch",
        "_become/_guard.py",
        "if type(layer) not in TWINS:",
        "if False:",
        ("tests/test_guard_checks_user_blocks.py",),
    ),
    Mutant(
        "unreached-inside-blocks",
        "di.build lists unreached twins that a deferred block declares",
        "_shape/_build.py",
        "unreached += [n for n in seen.deferred if n not in seen.values and n not in unreached]",
        "unreached += []",
        ("tests/test_build_unreached_inside_blocks.py",),
    ),
    Mutant(
        "build-registration-not-declaration",
        "a twin declared before its container is constructed first (d2l's shared layer)",
        "_shape/_build.py",
        "declared = sorted(twins, key=lambda pair: pair[1]._di.seq)",
        "declared = twins",
        ("tests/test_declaration_order.py",),
    ),
    Mutant(
        "changed-on-meta-ignored",
        "init code run on meta tensors before materialize is refused, never silently lost",
        "_fill/_materialize.py",
        "    if recorded or built:",
        "    if False:",
        ("tests/test_materialize_changed_on_meta.py",),
    ),
    Mutant(
        "copies-draw-their-own",
        "deep copies of an unbuilt twin start out equal, as eager's",
        "_declare/_copies.py",
        'if copies is None or device.type == "meta":',
        "if True:",
        ("tests/test_copies_start_equal.py", "tests/test_transformer_encoder_of_twins.py"),
    ),
    Mutant(
        "copies-calls-their-own",
        "init queued before the copying is shared by the copies",
        "_declare/_copies.py",
        "shared = [call for call in calls if call[0] in self.drawn.calls]",
        "shared = []",
        ("tests/test_copies_start_equal.py",),
    ),
    Mutant(
        "materialize-skips-real-layers",
        "a layer built on meta whose tensors became real still draws at materialize",
        "_fill/_materialize.py",
        "and state.meta_versions is not None",
        "and state.meta_versions is None",
        ("tests/test_materialize_draws_for_real_layers.py",),
    ),
    Mutant(
        "rewind-unseen",
        "a rewind of the generator inside a recorded constructor replays",
        "_record/_recorder.py",
        "        if read is not None and read[0] is state:",
        "        if False:",
        ("tests/test_recorded_rewinds.py",),
    ),
    Mutant(
        "load-keeps-draws",
        "a failed load puts the generators back",
        "_checkpoint/_load.py",
        "            if built:\n                generators.restore()",
        "            if False:\n                generators.restore()",
        ("tests/test_load_missing_keys.py",),
    ),
    Mutant(
        "fake-in-objects",
        "tensors in plain objects of a recording are replayed",
        "_record/_placeholders.py",
        "        elif _walkable(value):\n            seen.add(id(value))",
        "        elif False:\n            seen.add(id(value))",
        ("tests/test_record_held_in_objects.py",),
    ),
)


class StaleError(Exception):
    """The mutant's snippet is not in its file exactly once."""


def apply(text: str, mutant: Mutant) -> str:
    """``text`` with the mutant's snippet replaced; :class:`StaleError` unless the
    snippet occurs exactly once."""
    count = text.count(mutant.original)
    if count == 0:
        raise StaleError(f"stale: {mutant.original!r} is not in {mutant.file} (the code moved)")
    if count > 1:
        raise StaleError(f"ambiguous: {mutant.original!r} occurs {count} times in {mutant.file}")
    return text.replace(mutant.original, mutant.replacement)


@dataclass
class Result:
    mutant: Mutant
    status: str  # killed, survived, stale, error, timeout
    seconds: float = 0.0
    by: str = ""  # the first failing test (node id), or why
    confirmed: bool = True  # the killing test passes on the unmutated copy


# "FAILED tests/x.py::test[some id] - message": parametrize ids may hold spaces.
_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


def _pytest(
    tree: Path, targets: Sequence[str], timeout: float, *extra: str, first: bool = True
) -> tuple[int | None, str]:
    """Run pytest in ``tree`` on ``targets``; (exit code or None on timeout, output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tree / "src"), env.get("PYTHONPATH", "")) if p
    )
    # No .pyc files: a mutated source of the same size written within the same
    # second as the original would otherwise load the stale bytecode.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("COVERAGE_PROCESS_START", None)
    command = [sys.executable, "-m", "pytest", *(["-x"] if first else []), "-q"]
    command += ["-p", "no:cacheprovider"]
    command += ["-p", "no:randomly", *extra, *targets]
    process = subprocess.Popen(
        command,
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a timeout ends the ranks it started too
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return None, out
    return process.returncode, out


def copy_tree(source: Path, target: Path) -> Path:
    """A scratch copy of the repository (sources, tests, examples, settings)."""
    shutil.copytree(source, target, ignore=SKIP, symlinks=True)
    return target


def check_imports_copy(tree: Path) -> None:
    """The copy's package is the one imported (not the editable install)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    code = "import importlib.util as u; print(u.find_spec('deferinit').origin)"
    origin = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(origin).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"mutate: the tests would import {origin}, not the copy in {tree}")


def run_mutant(tree: Path, mutant: Mutant, timeout: float) -> Result:
    """Apply ``mutant`` in ``tree``, run its tests, put the file back."""
    path = tree / PACKAGE / mutant.file
    try:
        original = path.read_text()
    except FileNotFoundError:
        return Result(mutant, "stale", by=f"stale: no file {mutant.file}")
    try:
        mutated = apply(original, mutant)
    except StaleError as why:
        return Result(mutant, "stale", by=str(why))
    missing = [t for t in mutant.tests if not (tree / t.split("::")[0]).exists()]
    if missing:
        return Result(mutant, "error", by=f"no test file {', '.join(missing)}")
    path.write_text(mutated)
    start = time.perf_counter()
    try:
        code, out = _pytest(tree, mutant.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    if code is None:
        return Result(mutant, "timeout", seconds, by=f"no result in {timeout:.0f} s")
    if code == 0:
        return Result(mutant, "survived", seconds)
    failed = _FAILED.findall(out)
    if code in (1, 2) and failed:  # 2: a collection error (the mutant broke an import)
        return Result(mutant, "killed", seconds, by=failed[0])
    tail = " | ".join(out.strip().splitlines()[-3:])
    return Result(mutant, "error", seconds, by=f"pytest exit code {code}: {tail}")


def confirm(tree: Path, results: Iterable[Result], timeout: float) -> None:
    """Run the killing tests on the unmutated copy, all in one run; a kill by a
    test that fails there too is not a kill (``confirmed=False``)."""
    killed = [r for r in results if r.status == "killed"]
    tests = sorted({r.by for r in killed if "::" in r.by})
    failing: set[str] = set()
    if tests:
        code, out = _pytest(tree, tests, timeout, first=False)
        if code == 0:
            failing = set()
        elif code == 1:
            failing = set(_FAILED.findall(out))
        else:  # no verdict (collection error, timeout): nothing is confirmed
            failing = set(tests)
    for result in killed:
        if "::" in result.by:
            result.confirmed = result.by not in failing
        else:  # a collection error: the unmutated file must collect
            code, _ = _pytest(tree, [result.by], timeout, "--collect-only")
            result.confirmed = code == 0


def table(results: Sequence[Result]) -> str:
    rows = ["| # | mutant | file | result | s | caught by / why |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        status = r.status if r.confirmed else "killed (UNCONFIRMED: fails unmutated)"
        by = r.by.replace("|", "/")
        rows.append(
            f"| {i} | {r.mutant.name} | {r.mutant.file} | {status} | {r.seconds:.0f} | {by} |"
        )
    killed = sum(r.status in ("killed", "timeout") and r.confirmed for r in results)
    rows.append("")
    rows.append(f"kill ratio: {killed}/{len(results)} ({100 * killed / max(len(results), 1):.0f}%)")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"no mutant named {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:16} {m.promise}  [{' '.join(m.tests)}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="deferinit-mutate-") as scratch:
        tree = copy_tree(ROOT, Path(scratch) / "repo")
        check_imports_copy(tree)
        results = []
        for mutant in chosen:
            result = run_mutant(tree, mutant, args.timeout)
            print(
                f"{mutant.name}: {result.status} ({result.seconds:.0f} s) {result.by}", flush=True
            )
            results.append(result)
        confirm(tree, results, args.timeout)
    print()
    print(table(results))
    bad = [r for r in results if r.status not in ("killed", "timeout") or not r.confirmed]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
