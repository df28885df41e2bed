"""``deferinit demo --lang en|zh``: the same story in either language, one section per
step; the default language comes from the locale."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deferinit import cli
from deferinit._present._demo import LANGUAGES, STEPS, default_language, run_demo

CJK = re.compile(r"[\u4e00-\u9fff]")
HEADING = re.compile(r"^=== (\d+)\. (.*) ===$", re.MULTILINE)


@pytest.fixture(scope="module")
def told() -> dict[str, str]:
    """The whole demo in each language."""
    out = {}
    for language in LANGUAGES:
        buffer = io.StringIO()
        run_demo(buffer, language)
        out[language] = buffer.getvalue()
    return out


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) per section; the body without the note above the code."""
    parts = HEADING.split(text)[1:]
    sections = []
    for number in range(0, len(parts), 3):
        _, title, body = parts[number : number + 3]
        _note, _, session = body.strip("\n").partition("\n\n")  # the code and what it prints
        sections.append((title, session))
    return sections


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LANG": "zh_CN.UTF-8"}, "zh"),
        ({"LANG": "zh_TW.UTF-8"}, "zh"),
        ({"LANG": "zh"}, "zh"),
        ({"LANG": "en_US.UTF-8"}, "en"),
        ({"LANG": "fr_FR.UTF-8"}, "en"),
        ({"LANG": "C"}, "en"),
        ({}, "en"),
        ({"LC_ALL": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}, "zh"),
        ({"LC_ALL": "en_US.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),
        ({"LC_ALL": "", "LANG": "zh_CN.UTF-8"}, "zh"),
        ({"LC_MESSAGES": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}, "zh"),
    ],
)
def test_default_language_follows_the_locale(environ: dict[str, str], expected: str) -> None:
    assert default_language(environ) == expected


def test_both_languages_have_one_section_per_step_in_order(told: dict[str, str]) -> None:
    for language, text in told.items():
        sections = _sections(text)
        titles = [(step.en if language == "en" else step.zh)[0] for step in STEPS]
        assert [title for title, _ in sections] == titles, language


def test_both_languages_run_the_same_code_and_print_the_same(told: dict[str, str]) -> None:
    english, chinese = _sections(told["en"]), _sections(told["zh"])
    for (title, en_body), (_, zh_body) in zip(english, chinese, strict=True):
        assert en_body.strip(), f"{title}: no code shown"
        assert en_body == zh_body, f"{title}: the Chinese demo shows other code or output"


def test_the_chinese_demo_tells_the_story_in_chinese(told: dict[str, str]) -> None:
    for title, _ in _sections(told["zh"]):
        assert CJK.search(title), title
    for step in STEPS:
        assert all(CJK.search(text) for text in step.zh), step.en[0]
        assert not any(CJK.search(text) for text in step.en), step.en[0]
    assert "第一次前向传播" in told["zh"]
    assert "The first forward" not in told["zh"]


def _demo_through_main(argv: list[str]) -> str:
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert cli.main(argv) == 0
    return capture.getvalue()


def test_demo_without_lang_speaks_the_locales_language(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "zh_CN.UTF-8")
    assert _demo_through_main(["demo"]).startswith("deferinit 演示")
    monkeypatch.setenv("LANG", "en_US.UTF-8")
    assert _demo_through_main(["demo"]).startswith("deferinit demo:")


def test_lang_overrides_the_locale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LC_ALL", "zh_CN.UTF-8")
    assert _demo_through_main(["demo", "--lang", "en"]).startswith("deferinit demo:")


def test_an_unknown_language_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--lang", "fr"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fr'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="language 'fr' is not one of"):
        run_demo(io.StringIO(), "fr")


def test_a_terminal_without_chinese_gets_escapes_not_a_crash() -> None:
    src = str(Path(cli.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [sys.executable, "-m", "deferinit", "demo", "--lang", "zh"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode("ascii", "replace")
    assert b"\\u5ef6\\u540e\\u521d\\u59cb\\u5316" in result.stdout  # 延后初始化, escaped
