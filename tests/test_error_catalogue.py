"""docs/errors.md lists every public error class: a section for each, with an example
message and the fix (the examples come from tools/error_examples.py)."""

from __future__ import annotations

import re
from pathlib import Path

import deferinit as di
from deferinit import _errors

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def _public_error_classes() -> set[type[BaseException]]:
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [di.DeferredInitError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls.__module__.startswith("deferinit"):
            found.add(cls)
    for name in [*di.__all__, *_errors.__all__]:
        value = getattr(di, name, None) or getattr(_errors, name, None)
        if isinstance(value, type) and issubclass(value, di.DeferredInitError):
            found.add(value)
    return found


def test_every_public_error_class_has_a_section_with_an_example_and_a_fix() -> None:
    text = CATALOGUE.read_text()
    sections = dict(
        (m.group(1), m.group(2))
        for m in re.finditer(r"^## `(\w+)`\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    )
    classes = _public_error_classes()
    assert {"DeferredInitError", "ShapeMismatchError", "InferenceError", "NotBuiltError"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        assert cls.__name__ in sections, f"docs/errors.md has no section for {cls.__name__}"
        body = sections[cls.__name__]
        assert "```" in body, f"{cls.__name__}: no example message"
        assert "Fix:" in body, f"{cls.__name__}: no fix"
        assert f"[`{cls.__name__}`]" in text, f"{cls.__name__} is missing from the table"


def test_private_error_classes_are_caught_as_a_documented_public_one() -> None:
    public = _public_error_classes()
    todo: list[type[BaseException]] = [di.DeferredInitError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__.startswith("_"):
            assert any(issubclass(cls, p) for p in public if p is not di.DeferredInitError), cls
