"""The examples in other languages and frameworks, compiled and checked: the problem's own
gradient is named (`diagonal`, `missing_term`), the corrected one passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import normgrad
from normgrad.check import check_gradients

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _compile(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def c_program(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler on this machine")
    out = tmp_path_factory.mktemp("c") / "norm"
    _compile([cc, "-O2", "-Wall", "-Werror", "-o", str(out), str(EXAMPLES / "c" / "norm.c"), "-lm"])
    return str(out)


@pytest.fixture(scope="module")
def csharp_program(tmp_path_factory) -> str:
    if shutil.which("mcs") is None:
        pytest.skip("mcs is absent (Debian: apt-get install mono-mcs)")
    out = tmp_path_factory.mktemp("cs") / "norm.exe"
    _compile(["mcs", f"-out:{out}", str(EXAMPLES / "csharp" / "Norm.cs")])
    return f"mono {out}"


@pytest.fixture(params=["c", "csharp"])
def program(request) -> str:
    return str(request.getfixturevalue(f"{request.param}_program"))


X = np.random.default_rng(0).standard_normal((6, 6))


def test_the_problems_gradient_is_named(program):
    report = check_gradients(normgrad.external(f"{program} chain"), X)
    assert not report.ok
    assert {f.kind for f in report.diagnosis} >= {"diagonal", "missing_term"}, report


def test_the_corrected_gradient_passes(program):
    report = check_gradients(normgrad.external(f"{program} right"), X)
    assert report.ok, report
    assert report.max_abs_error < 1e-8


def test_the_forward_matches_normgrad(program):
    with normgrad.external(f"{program} right") as prog:
        y = prog(X)
    np.testing.assert_allclose(y, normgrad.normalize(X, eps=1e-5), rtol=1e-13, atol=1e-13)


def test_jvp_is_refused_and_the_check_goes_on(program):
    prog = normgrad.external(f"{program} right")
    assert not prog.supports_jvp(X)
    prog.close()


def test_the_cli_names_the_mistake(program, capsys):
    from normgrad import cli

    assert cli.main(["check", "--exec", f"{program} chain", "--shape", "6x6"]) == 1
    out = capsys.readouterr().out
    assert "diagonal" in out and "missing_term" in out
    assert cli.main(["check", "--exec", f"{program} right", "--shape", "6x6"]) == 0


@pytest.mark.parametrize("example", ["torch_function", "jax_custom_vjp"])
def test_framework_examples_through_the_api_and_the_cli(example, capsys):
    pytest.importorskip("torch" if example.startswith("torch") else "jax")
    import importlib.util

    from normgrad import cli

    spec = importlib.util.spec_from_file_location(f"ex_{example}", EXAMPLES / f"{example}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for dtype in (np.float64, np.float32):
        assert check_gradients(mod.right, X.astype(dtype)).ok
        wrong = check_gradients(mod.wrong, X.astype(dtype))
        assert {f.kind for f in wrong.diagnosis} >= {"diagonal", "missing_term"}, wrong
    path = EXAMPLES / f"{example}.py"
    assert cli.main(["check", "--forward", f"{path}:wrong", "--shape", "6x6"]) == 1
    assert "missing_term" in capsys.readouterr().out
    assert cli.main(["check", "--forward", f"{path}:right", "--shape", "6x6"]) == 0


def test_cli_forward_without_backward_needs_a_framework_function(tmp_path, capsys):
    path = tmp_path / "plain.py"
    path.write_text("import numpy as np\ndef f(x):\n    return np.sin(x)\n")
    from normgrad import cli

    assert cli.main(["check", "--forward", f"{path}:f", "--shape", "3"]) == 2
    assert "add --backward" in capsys.readouterr().err
