"""``deferinit summary FILE_OR_MODULE:FACTORY --input-shape ...``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from deferinit import cli

FACTORY = Path(__file__).resolve().parents[1] / "examples" / "tiny_factory.py"
ERROR = "deferinit summary: error: "


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["summary", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture
def fresh_modules() -> Iterator[None]:
    """Forget modules a test imports, so that each test imports its own files."""
    before = set(sys.modules)
    path = list(sys.path)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
    assert sys.path == path  # the CLI puts back what it added


def test_summary_of_a_file_factory_with_input_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(capsys, f"{FACTORY}:make_model", "--input-shape", "2,20")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "name",
        "layer",
        "arguments",
        "output",
        "parameters",
        "count",
        "state",
    ]
    assert lines[2].split() == [
        "0", "Linear", "in_features=20", "(2,", "256)", "weight", "(256,", "20),", "bias",
        "(256,)", "5,376", "deferred",
    ]  # fmt: skip
    assert "Parameters: 7,946 (7,946 trainable)" in lines
    assert "Output: (2, 10)" in lines


def test_without_input_shape_sizes_are_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(capsys, f"{FACTORY}:make_model")
    assert code == 0
    assert "in_features=?" in out
    assert "weight (256, ?)" in out
    assert "Output:" not in out


def test_device_meta_summarizes_without_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    # 10**6 x 10**6 floats are 4 TB: the factory runs under torch.device("meta").
    path = _write(
        tmp_path,
        "huge.py",
        """
        from torch import nn
        from deferinit import nn as dnn

        def make() -> nn.Module:
            return nn.Sequential(nn.Linear(10**6, 10**6), dnn.Linear(10))
        """,
    )
    code, out, err = _main(capsys, f"{path}:make", "--input-shape", "4,1000000", "--device", "meta")
    assert (code, err) == (0, "")
    assert "1,000,001,000,000  meta" in out
    assert "in_features=1000000" in out
    assert "Output: (4, 10)" in out


def test_several_inputs_and_an_integer_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    path = _write(
        tmp_path,
        "models.py",
        """
        from torch import nn
        from deferinit import nn as dnn

        def two_inputs() -> nn.Module:
            return dnn.Bilinear(4)

        def tokens() -> nn.Module:
            return nn.Sequential(nn.Embedding(100, 8), dnn.Linear(4))
        """,
    )
    code, out, _ = _main(
        capsys, f"{path}:two_inputs", "--input-shape", "2,3", "--input-shape", "2,5"
    )
    assert code == 0
    assert "in1_features=3, in2_features=5" in out
    assert "weight (4, 3, 5)" in out
    code, out, _ = _main(capsys, f"{path}:tokens", "--input-shape", "2,7", "--dtype", "int64")
    assert code == 0
    assert "Output: (2, 7, 4)" in out


def test_a_dotted_module_from_the_working_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fresh_modules: None,
) -> None:
    _write(tmp_path, "zoo_pkg/__init__.py", "")
    _write(
        tmp_path,
        "zoo_pkg/nets.py",
        """
        from torch import nn
        from deferinit import nn as dnn

        def make() -> nn.Module:
            return nn.Sequential(dnn.Linear(3), nn.Tanh())
        """,
    )
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(capsys, "zoo_pkg.nets:make", "--input-shape", "1,6")
    assert (code, err) == (0, "")
    assert "in_features=6" in out


BAD_FILES = {
    "factory_raises": (
        "def make():\n    raise ValueError('no weights here')\n",
        "make() raised ValueError: no weights here",
    ),
    "not_a_module": ("def make():\n    return 3\n", "make() returned int, not a torch.nn.Module"),
    "not_callable": ("make = 3\n", "has no factory 'make' (a callable)"),
    "import_fails": (
        "import torch\nraise RuntimeError('broken\\nfile')\n",
        "raised RuntimeError: broken file",
    ),
    "syntax_error": ("def make(:\n", "raised SyntaxError"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_factories_give_one_line_errors_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    body, message = BAD_FILES[case]
    path = _write(tmp_path, f"{case}.py", body)
    code, out, err = _main(capsys, f"{path}:make", "--input-shape", "2,3")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(ERROR)
    assert message in err


BAD_ARGUMENTS = [
    (["examples/no_such_file.py:make_model"], "no such file: examples/no_such_file.py"),
    ([f"{FACTORY}:missing"], "has no factory 'missing'"),
    ([str(FACTORY)], "does not name a factory; expected FILE.py:FACTORY"),
    ([f"{FACTORY}:"], "does not name a factory"),
    (["no_such_package_xyz.models:make"], "No module named 'no_such_package_xyz'"),
    ([f"{FACTORY}:make_model", "--input-shape", "2,x"], "--input-shape '2,x' is not a shape"),
    ([f"{FACTORY}:make_model", "--input-shape", ""], "--input-shape '' is not a shape"),
    ([f"{FACTORY}:make_model", "--input-shape", "2,,3"], "--input-shape '2,,3' is not a shape"),
    ([f"{FACTORY}:make_model", "--input-shape", "-1,3"], "--input-shape '-1,3' is not a shape"),
    ([f"{FACTORY}:make_model", "--input-shape=2,-3"], "--input-shape '2,-3' is not a shape"),
    ([f"{FACTORY}:make_model", "--dtype", "floaty"], "--dtype 'floaty' is not a torch dtype"),
    ([f"{FACTORY}:make_model", "--device", "toaster"], "--device 'toaster' is not a torch device"),
    (
        [f"{FACTORY}:make_convnet", "--input-shape", "2,3"],
        "the model does not run on inputs (2,3): InferenceError: Conv2d layer '0'",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS)
def test_bad_arguments_give_one_line_errors_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    code, out, err = _main(capsys, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1, err
    assert err.startswith(ERROR)
    assert message in err


def test_python_dash_m_deferinit_summary() -> None:
    src = str(Path(cli.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deferinit", "summary", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=env,
            timeout=120,
            check=False,
        )

    good = run(f"{FACTORY}:make_model", "--input-shape", "2,20", "--device", "meta")
    assert good.returncode == 0, good.stderr
    assert "in_features=20" in good.stdout
    bad = run(f"{FACTORY}:make_model", "--input-shape", "2,x")
    assert bad.returncode == 2
    assert bad.stderr.startswith(ERROR)
    assert bad.stdout == ""


def test_shapes_take_the_models_dtype_and_allocate_no_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fresh_modules: None
) -> None:
    path = _write(
        tmp_path,
        "kinds.py",
        """
        import torch
        from torch import nn
        from deferinit import nn as dnn

        def tokens() -> nn.Module:
            return nn.Sequential(nn.Embedding(100, 8), dnn.Linear(3))

        def doubles() -> nn.Module:
            f64 = torch.float64
            return nn.Sequential(dnn.Linear(4, dtype=f64), dnn.Linear(2, dtype=f64))
        """,
    )
    code, out, _ = _main(capsys, f"{path}:tokens", "--input-shape", "2,7")
    assert code == 0 and "Output: (2, 7, 3)" in out
    code, out, _ = _main(capsys, f"{path}:doubles", "--input-shape", "2,3")
    assert code == 0 and "Output: (2, 2)" in out
    # An input of 800 GB as float32: only its shape goes through.
    code, out, _ = _main(capsys, f"{path}:doubles", "--input-shape", "100000,100000,20")
    assert code == 0 and "Output: (100000, 100000, 2)" in out
