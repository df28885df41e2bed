"""The ``deferinit`` command line.

Subcommands:

- ``deferinit demo``: walk through deferred initialization (延后初始化) on the
  classic d2l MLP.

Each subcommand is one entry in :func:`_parser` with a handler that takes the
parsed arguments and returns the exit code; ``summary`` (DESIGN §2) will be
added the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from . import __version__
from ._demo import run_demo

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _demo(args: argparse.Namespace) -> int:
    run_demo(sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deferinit",
        description="Deferred initialization (延后初始化) for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="walk through deferred initialization on the d2l MLP",
        description="Walk through deferred initialization (延后初始化) on the d2l MLP: "
        "sizes shown as '?', an initializer that runs at the first forward, the build, "
        "and the error for a changed input size.",
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code. Usage errors (an unknown subcommand) exit with code 2, as argparse does.
    """
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: end quietly, as the
        # Python docs advise (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
