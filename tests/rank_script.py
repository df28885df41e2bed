"""A test file that is also the script each of two gloo ranks runs.

``run_as_rank(rank_main)`` in the file's ``if __name__ == "__main__":`` block runs the
rank's checks, prints any failure's traceback, and exits 0 or 1 *without finalizing the
interpreter*: gloo's worker threads, kept alive through DTensor's sharding caches, can
abort a finalizing interpreter now and then ("terminate called without an active
exception"), which would fail a run whose checks all passed.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_without_finalizing(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_as_rank(rank_main: Callable[[], None]) -> NoReturn:
    try:
        rank_main()
    except BaseException:
        traceback.print_exc()
        exit_without_finalizing(1)
    exit_without_finalizing(0)
