"""The package as a user gets it: ``python -m build`` makes a wheel and an sdist that
carry the package and its license, with the metadata a package index shows, and the
wheel installed in a fresh venv (torch first, as ``make setup`` does) runs
``deferinit demo``.

Slow by nature (a build, a venv and a torch install: about a minute); no timing is
asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = version("deferinit")
# The torch the fresh venv gets first, as the Makefile's TORCH: the release CI runs on.
# Installed before the wheel, so the wheel's torch requirement is already met (a bare
# ``torch`` requirement would pull a multi-GB CUDA build).
TORCH = "torch==2.13.0"
URLS = ("Homepage", "Documentation", "Repository", "Changelog", "Issues")


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path


def _env() -> dict[str, str]:
    """This process's environment without what ties a child to this venv."""
    env = {
        k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    shown = " ".join(str(part) for part in command)
    assert result.returncode == 0, f"{shown}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """A wheel and an sdist of this checkout, as ``python -m build`` makes them (the
    wheel is built from the sdist, so the sdist is complete enough to build)."""
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    wheels = sorted(out.glob("*.whl"))
    sdists = sorted(out.glob("*.tar.gz"))
    assert [p.name for p in wheels] == [f"deferinit-{VERSION}-py3-none-any.whl"], wheels
    assert [p.name for p in sdists] == [f"deferinit-{VERSION}.tar.gz"], sdists
    return Dists(wheels[0], sdists[0])


def _wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"deferinit-{VERSION}.dist-info/METADATA").decode()
    return Parser().parsestr(text)


def test_wheel_holds_the_typed_package_its_license_and_the_console_script(
    dists: Dists,
) -> None:
    info = f"deferinit-{VERSION}.dist-info"
    with zipfile.ZipFile(dists.wheel) as archive:
        names = set(archive.namelist())
        license_text = archive.read(f"{info}/licenses/LICENSE")
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    for name in ("__init__.py", "py.typed", "nn.py", "cli.py", "_errors.py"):
        assert f"deferinit/{name}" in names, sorted(names)
    assert not any(name.startswith("tests/") for name in names), sorted(names)
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert "deferinit = deferinit.cli:main" in entry_points


def test_sdist_holds_the_license_the_package_and_its_tests_and_no_local_state(
    dists: Dists,
) -> None:
    top = f"deferinit-{VERSION}"
    with tarfile.open(dists.sdist) as archive:
        names = set(archive.getnames())
        member = archive.extractfile(f"{top}/LICENSE")
        assert member is not None
        license_text = member.read()
    for name in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "src/deferinit/__init__.py",
        "src/deferinit/py.typed",
        "tests/test_packaging.py",
    ):
        assert f"{top}/{name}" in names, sorted(names)
    assert license_text == (ROOT / "LICENSE").read_bytes()
    local = ("/.venv", "/site/", "__pycache__", "/.pytest_cache", "/.mypy_cache", "/.coverage")
    assert not [n for n in names if any(part in n for part in local)]


def test_metadata_shows_license_project_urls_classifiers_and_keywords(dists: Dists) -> None:
    meta = _wheel_metadata(dists.wheel)
    assert meta["Name"] == "deferinit"
    assert meta["Version"] == VERSION
    assert meta["License"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    assert "Operating System :: OS Independent" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Intended Audience :: ") for c in classifiers)
    for minor in (10, 11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in classifiers
    urls = dict(
        (label.strip(), url.strip())
        for label, url in (entry.split(",", 1) for entry in meta.get_all("Project-URL") or [])
    )
    assert sorted(urls) == sorted(URLS), urls
    assert all(url.startswith("https://") for url in urls.values()), urls
    assert "pytorch" in (meta["Keywords"] or "").split(",")
    torch_requirement = [r for r in meta.get_all("Requires-Dist") or [] if r.startswith("torch")]
    assert len(torch_requirement) == 1 and "<" in torch_requirement[0], torch_requirement


def test_wheel_installed_in_a_fresh_venv_runs_deferinit_demo(dists: Dists, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    _run(python, "-m", "pip", "install", "-q", TORCH, cwd=tmp_path)
    _run(python, "-m", "pip", "install", "-q", dists.wheel, cwd=tmp_path)

    where = _run(python, "-c", "import deferinit; print(deferinit.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel's copy, not src/

    demo = _run(bin_dir / "deferinit", "demo", cwd=tmp_path)
    assert "Linear(in_features=?, out_features=256, bias=True)" in demo
    assert "Linear(in_features=20, out_features=256, bias=True)" in demo
    assert "ShapeMismatchError" in demo
