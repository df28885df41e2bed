"""The ``deferinit`` command line.

Subcommands:

- ``deferinit demo [--lang en|zh]``: walk through deferred initialization (延后初始化),
  step by step, in English or Chinese (default: the locale's language).
- ``deferinit summary FILE_OR_MODULE:FACTORY --input-shape 2,20``: print
  :func:`deferinit.summary` of the model a Python factory returns.

Each subcommand is one entry in :func:`_parser` with a handler that takes the
parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._present._demo import LANGUAGES, default_language, run_demo
from ._present._summary import summary

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _demo(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    if isinstance(sys.stdout, io.TextIOWrapper) and not _can_print("延后初始化"):
        # A terminal that cannot show Chinese (the English story names 延后初始化 too):
        # show what it cannot as escapes rather than fail.
        sys.stdout.reconfigure(errors="backslashreplace")
    run_demo(sys.stdout, language)
    return 0


def _can_print(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class _UsageError(Exception):
    """Bad input to a subcommand: reported on one line, exit code 2."""


def _summary(args: argparse.Namespace) -> int:
    try:
        shapes = [_shape(text) for text in args.input_shape]
        dtype = _dtype(args.dtype) if args.dtype is not None else None
        device = _device(args.device)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = _load_model(args.target)
        # Shapes, or meta tensors of the dtype asked for: a shape-only pass allocates
        # no input (a shape takes the model's dtype, or token ids before an Embedding).
        examples: list[Any] = [
            torch.Size(shape) if dtype is None else torch.empty(shape, dtype=dtype, device="meta")
            for shape in shapes
        ]
        try:
            table = summary(model, *examples)
        except Exception as error:  # the examples do not fit the model: still bad input
            given = ", ".join(f"({text})" for text in args.input_shape)
            message = f"the model does not run on inputs {given}: {_one_line(error)}"
            raise _UsageError(message) from error
    except _UsageError as error:
        print(f"deferinit summary: error: {error}", file=sys.stderr)
        return 2
    print(table)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdecimal() for p in parts):
        raise _UsageError(
            f"--input-shape {text!r} is not a shape; expected sizes (integers, 0 or more) "
            f"separated by commas, such as 2,20 (batch of 2, 20 features)"
        )
    return tuple(int(p) for p in parts)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise _UsageError(f"--dtype {name!r} is not a torch dtype; e.g. float32, bfloat16, int64")
    return dtype


def _device(name: str | None) -> torch.device | None:
    if name is None:
        return None
    try:
        return torch.device(name)
    except RuntimeError:
        message = f"--device {name!r} is not a torch device; e.g. meta, cpu, cuda"
        raise _UsageError(message) from None


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    # As `python file.py` and `python -m pkg.mod` do: the file's folder (or the
    # working directory) is importable while the target loads and builds.
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _load_model(target: str) -> torch.nn.Module:
    where, colon, factory_name = target.rpartition(":")
    if not colon or not where or not factory_name.isidentifier():
        raise _UsageError(
            f"{target!r} does not name a factory; expected FILE.py:FACTORY or "
            f"package.module:FACTORY, e.g. examples/tiny_factory.py:make_model"
        )
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    folder = str(Path(where).resolve().parent) if is_file else os.getcwd()
    with _on_path(folder):
        module = _import_file(where) if is_file else _import_module(where)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise _UsageError(f"{where} has no factory {factory_name!r} (a callable)")
        try:
            model = factory()
        except Exception as error:
            raise _UsageError(f"{factory_name}() raised {_one_line(error)}") from error
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(
            f"{factory_name}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise _UsageError(f"no such file: {path}")
    name = f"_deferinit_summary_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise _UsageError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that dataclasses and pickling in it work
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise _UsageError(f"importing {path} raised {_one_line(error)}") from error
    return module


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise _UsageError(f"importing {name} raised {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deferinit",
        description="Deferred initialization (延后初始化) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="walk through deferred initialization (延后初始化), step by step",
        description="Walk through deferred initialization (延后初始化), step by step, after "
        "d2l's chapter: sizes shown as '?', an initializer that runs at the first forward, "
        "the build, the error for a changed input size, LeNet at two resolutions, a custom "
        "block, a model larger than memory, any model recorded, torch.nn.Lazy* adopted.",
    )
    demo.add_argument(
        "--lang",
        choices=LANGUAGES,
        default=None,
        help="en (English) or zh (中文); default: zh when LC_ALL, LC_MESSAGES or LANG "
        "starts with zh, else en",
    )
    demo.set_defaults(handler=_demo)
    table = commands.add_parser(
        "summary",
        help="print the summary table of a model that a Python factory returns",
        description="Import FILE.py or package.module, call FACTORY() (no arguments) and "
        "print di.summary of the model it returns: each layer's inferred arguments, "
        "output shape, parameter shapes and state. With --input-shape the sizes are "
        "inferred by a shape-only pass that computes nothing and changes nothing.",
    )
    table.add_argument(
        "target",
        metavar="FILE_OR_MODULE:FACTORY",
        help="e.g. path/to/model.py:make_model or mypkg.models:make_model",
    )
    table.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="SHAPE",
        help="shape of one forward argument, sizes separated by commas (2,20); "
        "repeat for several arguments",
    )
    table.add_argument(
        "--dtype",
        default=None,
        help="dtype of the examples (default: as a shape takes it: the model's floating "
        "dtype, or token ids where an nn.Embedding comes first)",
    )
    table.add_argument(
        "--device",
        default=None,
        help="device for the factory and the examples; meta summarizes without allocating",
    )
    table.set_defaults(handler=_summary)
    return parser


def _glue_negative_shapes(argv: list[str]) -> list[str]:
    # argparse reads "--input-shape -1,3" as an option named "-1,3"; pass it as the
    # value so that the shape check explains what is wrong with it.
    out: list[str] = []
    for token in argv:
        if out and out[-1] == "--input-shape" and token[:1] == "-" and token[1:2].isdecimal():
            out[-1] = f"--input-shape={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code. Usage errors (an unknown subcommand) exit with code 2, as argparse does.
    """
    args = _parser().parse_args(_glue_negative_shapes(sys.argv[1:] if argv is None else argv))
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: end quietly, as the
        # Python docs advise (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
