"""``python -m deferinit``: the same command line as ``deferinit`` (see :mod:`deferinit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
