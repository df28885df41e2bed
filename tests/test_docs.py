"""Every ```` ```python ```` block of the docs and the READMEs runs, so the docs cannot
drift from the code.

Per file, the blocks run in order in one namespace, as in a notebook: a block whose
last statement is an expression shows its value, as Jupyter would. A block may carry
markers (HTML comments right above it, read by tools/make_notebook.py):
``<!-- raises: ShapeMismatchError -->`` (its last statement must raise that),
``<!-- pending: di.adopt -->`` (an API that does not work yet: a visible skip),
``<!-- skip: why -->`` (cannot run here: a visible skip), ``<!-- torchrun -->`` (runs as
rank 0 of a one-process ``torchrun``), and ``<!-- output -->`` above a ```` ```text ````
block that must equal what the code block before it printed.

The site itself builds with ``mkdocs build --strict`` (``test_site_builds_strict``), and
its API page names every public name.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.util
import inspect
import io
import os
import re
import socket
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist

import deferinit as di
from deferinit import nn as dnn

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


make_notebook = _load("deferinit_make_notebook", ROOT / "tools" / "make_notebook.py")
Block = Any  # make_notebook.Block, loaded from a file: not a static type

FILES = sorted(
    [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "README.zh-CN.md"],
    key=lambda p: str(p.relative_to(ROOT)),
)

#: Blocks in pages this suite does not own that cannot run as written yet, by
#: (file, index among its python blocks): they need a marker in the page itself.
NEEDS_MARKER: dict[tuple[str, int], str] = {}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _python_blocks(path: Path) -> list[tuple[int, Block]]:
    blocks = make_notebook.read_blocks(path.read_text(encoding="utf-8"))
    return list(enumerate(b for b in blocks if b.is_python))


def _not_run(path: Path, index: int, block: Block) -> str | None:
    """Why this block is not run, or None if it runs."""
    marker = block.not_run
    if marker is not None:
        return f"{marker.kind}: {marker.value}"
    known = NEEDS_MARKER.get((_name(path), index))
    return f"needs a marker in the page: {known}" if known else None


def _skipped_cases() -> list[Any]:
    return [
        pytest.param(path, block, why, id=f"{_name(path)}:{block.line}")
        for path in FILES
        for index, block in _python_blocks(path)
        if (why := _not_run(path, index, block)) is not None
    ]


# torch's warnings about its own code, which the pages reach (as tests/test_compile_export.py
# explains): importing inductor at the first torch.compile uses torch.jit.script_method, and
# Dynamo probes ``.grad`` of non-leaf activations at a graph break (the first call builds).
TORCH_OWN_WARNINGS = [
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning",
]


@pytest.mark.parametrize("path", FILES, ids=_name)
@pytest.mark.filterwarnings(TORCH_OWN_WARNINGS[0])
@pytest.mark.filterwarnings(TORCH_OWN_WARNINGS[1])
def test_every_python_block_of_the_page_runs(path: Path) -> None:
    blocks = make_notebook.read_blocks(path.read_text(encoding="utf-8"))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    shown: str | None = ""  # what the last code block printed (None: it did not run)
    index = -1
    with _isolated(), _torchrun_env() as torchrun:
        for block in blocks:
            if block.is_output:
                if shown is not None:
                    _check_output(path, block, shown)
                continue
            if not block.is_python:
                continue
            index += 1
            if _not_run(path, index, block) is not None:
                shown = None
                continue
            if block.marker("torchrun"):
                torchrun()
            shown = _run_block(path, block, namespace)


@pytest.mark.parametrize(("path", "block", "why"), _skipped_cases())
def test_blocks_that_do_not_run_yet_say_why(path: Path, block: Block, why: str) -> None:
    pytest.skip(f"{_name(path)} line {block.line}: {why}")


def test_no_python_block_is_indented_where_the_runner_cannot_see_it() -> None:
    for path in FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not line.lstrip().startswith("```python") or line.startswith("```"), (
                f"{_name(path)}:{number}: an indented python block is not run; unindent it"
            )


def test_markers_sit_on_blocks_that_use_them() -> None:
    for path in FILES:
        for block in make_notebook.read_blocks(path.read_text(encoding="utf-8")):
            where = f"{_name(path)}:{block.line}"
            for marker in block.markers:
                if marker.kind == "output":
                    assert block.language == "text", f"{where}: output goes on a text block"
                else:
                    assert block.is_python, f"{where}: {marker.kind} goes on a python block"
                if marker.kind in ("pending", "skip", "raises"):
                    assert marker.value, f"{where}: {marker.kind} needs a reason or an error"


def _without_comments(code: str) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return [(t.type, t.string) for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]


def test_the_english_and_chinese_tutorials_run_the_same_code() -> None:
    english, chinese = (
        [
            (b.language, b.markers, _without_comments(b.text) if b.is_python else b.text)
            for b in make_notebook.read_blocks((ROOT / "docs" / name).read_text(encoding="utf-8"))
            if b.language is not None
        ]
        for name in ("tutorial.md", "tutorial.zh.md")
    )
    assert len(english) == len(chinese)
    for number, (en, zh) in enumerate(zip(english, chinese, strict=True)):
        assert en == zh, f"code block {number} differs between tutorial.md and tutorial.zh.md"


# -- running a block ------------------------------------------------------------------------


def _run_block(path: Path, block: Block, namespace: dict[str, Any]) -> str:
    where = f"{_name(path)}:{block.line}"
    tree = ast.parse(block.text, filename=where)
    body, last = tree.body[:-1], tree.body[-1:]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            _exec(body, where, namespace)
            raises = block.marker("raises")
            if raises is not None:
                expected = _error_class(raises.value, namespace)
                with pytest.raises(expected) as raised:
                    _exec(last, where, namespace)
                print(f"{type(raised.value).__name__}: {raised.value}")  # as a traceback ends
            elif last and isinstance(last[0], ast.Expr):
                value = eval(compile(ast.Expression(last[0].value), where, "eval"), namespace)
                if value is not None:  # shown as Jupyter shows a cell's last value
                    print(repr(value))
            else:
                _exec(last, where, namespace)
    except BaseException:
        sys.stdout.write(captured.getvalue())
        raise
    return captured.getvalue()


def _exec(statements: list[ast.stmt], where: str, namespace: dict[str, Any]) -> None:
    module = ast.Module(body=statements, type_ignores=[])
    exec(compile(module, where, "exec"), namespace)


def _error_class(name: str, namespace: dict[str, Any]) -> type[BaseException]:
    for scope in (namespace, vars(di), vars(builtins)):
        with contextlib.suppress(Exception):
            found = eval(name, dict(scope))
            if isinstance(found, type) and issubclass(found, BaseException):
                return found
    raise AssertionError(f"<!-- raises: {name} -->: no such exception class")


def _check_output(path: Path, block: Block, shown: str) -> None:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip("\n").splitlines()]

    assert lines(shown) == lines(block.text), (
        f"{_name(path)}:{block.line}: the output shown differs from what the code prints:\n{shown}"
    )


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """A page may seed, change the default dtype or print: none of it leaks out."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


@contextlib.contextmanager
def _torchrun_env() -> Iterator[Any]:
    """``start()`` sets what ``torchrun`` sets for rank 0 of one process; at the end of
    the page the environment is restored and any process group destroyed."""
    saved = dict(os.environ)

    def start() -> None:
        if os.environ.get("RANK") == "0" and "MASTER_PORT" in os.environ:
            return  # an earlier block of this page started it
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )

    try:
        yield start
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


# -- the site -------------------------------------------------------------------------------


def test_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "api" / "index.html").is_file()


@dataclass(frozen=True)
class _Public:
    name: str  # as written in docs/api.md: deferinit.build, deferinit.nn.Linear
    obj: object


def _public_names() -> list[_Public]:
    names = [_Public(f"deferinit.{n}", getattr(di, n)) for n in di.__all__ if n != "nn"]
    names += [_Public(f"deferinit.nn.{n}", getattr(dnn, n)) for n in dnn.__all__]
    return [p for p in names if not isinstance(p.obj, str)]  # __version__


def test_api_page_documents_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    hooks = _load("deferinit_docs_hooks", ROOT / "docs" / "_hooks.py")
    assert hooks.WILDCARD in page.splitlines()
    page = page.replace(hooks.WILDCARD + "\n", hooks.twin_entries())
    entries = {line.split()[1] for line in page.splitlines() if line.startswith("::: ")}
    for public in _public_names():
        assert public.name in entries, f"docs/api.md has no '::: {public.name}'"


def test_the_api_page_shows_doctest_sessions_as_code_and_roles_as_code() -> None:
    griffe_extension = _load("deferinit_docs_griffe", ROOT / "docs" / "_griffe.py")
    docstring = "Fill it; see :func:`deferinit.build`.\n\n>>> f(\n...     1)\n2\n\nThen more."
    assert griffe_extension.markdown_docstring(docstring).splitlines() == [
        "Fill it; see `deferinit.build`.",
        "",
        "```pycon",
        ">>> f(",
        "...     1)",
        "2",
        "```",
        "",
        "Then more.",
    ]


#: Public names whose docstrings have no ``>>>`` example yet (their modules are
#: not this suite's to edit). New public names must come with an example.
NO_EXAMPLE_YET: set[str] = set()

#: (public name, argument) pairs whose docstring does not name the argument yet.
ARGUMENT_NOT_NAMED_YET: set[tuple[str, str]] = set()


def _code_names() -> list[_Public]:
    """The public classes and functions (not data such as ``nn.TWINS``)."""
    return [p for p in _public_names() if inspect.isclass(p.obj) or inspect.isfunction(p.obj)]


def test_every_public_class_and_function_has_a_docstring() -> None:
    for public in _code_names():
        assert inspect.getdoc(public.obj), f"{public.name} has no docstring"


def test_public_names_without_an_example_are_only_the_known_ones() -> None:
    missing = {p.name for p in _code_names() if ">>>" not in (inspect.getdoc(p.obj) or "")}
    assert missing <= NO_EXAMPLE_YET, f"add a >>> example to: {sorted(missing - NO_EXAMPLE_YET)}"


def test_docstrings_name_every_argument_but_the_known_ones() -> None:
    unnamed = set()
    for public in _code_names():
        obj = public.obj
        if not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
            continue  # an error class takes its message
        doc = inspect.getdoc(obj) or ""
        for argument in inspect.signature(obj).parameters:
            if not re.search(rf"\b{re.escape(argument)}\b", doc):
                unnamed.add((public.name, argument))
    new = sorted(unnamed - ARGUMENT_NOT_NAMED_YET)
    assert not new, f"docstrings that do not name these arguments: {new}"
