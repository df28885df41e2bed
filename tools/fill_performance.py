"""Write the figures of one ``benchmarks/run.py --json`` run into docs/performance.md.

Every row of that page whose first cell names figures (`` `key` ``, or several
separated by commas) gets its "measured" cell from the JSON; the "Measured on … on …"
line gets the machine and the date of the run. So no number on the page is typed by
hand. Run: ``.venv/bin/python tools/fill_performance.py benchmarks/results.json``.

>>> _cell({"a_s": 1.23456, "b_mib": 300.4}, ["a_s", "b_mib"])
'1.23 s, 300 MiB'
"""

from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"


def _value(key: str, value: float | None) -> str:
    if value is None:
        return "failed"
    if key.endswith("_mib"):
        return f"{value:.0f} MiB"
    if key.endswith("_s"):
        return f"{value:.2f} s"
    if key.endswith("_exponent"):
        return f"{value:.2f}"
    return f"{value:.2f}×"


def _cell(figures: dict[str, float | None], keys: list[str]) -> str:
    return ", ".join(_value(k, figures.get(k)) for k in keys)


def fill(text: str, figures: dict[str, float | None], where: str) -> str:
    out = []
    for line in text.splitlines():
        cells = line.split(" | ")
        keys = re.findall(r"`([a-z0-9_]+)`", cells[0]) if line.startswith("| `") else []
        if keys and all(k in figures for k in keys) and len(cells) >= 4:
            cells[-2] = _cell(figures, keys)
            line = " | ".join(cells)
        out.append(line)
    filled = "\n".join(out) + "\n"
    return re.sub(r"\*\*Measured on\*\* .*? \*\*by\*\*", f"**Measured on** {where} **by**", filled)


def main(argv: list[str]) -> int:
    """``results.json "machine" "date"``: the run's figures, where and when it ran."""
    figures = json.loads(Path(argv[0]).read_text())
    machine = argv[1] if len(argv) > 1 else f"{platform.machine()} CPU"
    when = argv[2] if len(argv) > 2 else "the date of the run"
    PAGE.write_text(fill(PAGE.read_text(), figures, f"{machine} **on** {when}"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
