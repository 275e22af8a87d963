"""The `normgrad` command line as a whole: errors shared by the commands (exit 2 in one line),
help and version, rich or plain output, the progress bar, `python -m normgrad`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import assert_usage_error, run

import normgrad
from normgrad.cli import _output


@pytest.mark.parametrize("command", ["check", "explain", "vectors", "demo"])
def test_negative_seed_is_a_usage_error(capsys, command):
    assert_usage_error(capsys, command, "--seed", "-1", match="int >= 0")


def test_unwritable_plot_and_output_exit_2(capsys, tmp_path):
    missing = tmp_path / "no" / "such"
    assert_usage_error(capsys, "vectors", "-o", str(missing / "v.json"), match="cannot write")
    assert_usage_error(capsys, "vectors", "-o", str(missing / "v.npz"), match="cannot write")
    pytest.importorskip("matplotlib")
    assert_usage_error(
        capsys, "check", "--shape", "3", "--plot", str(missing / "p.png"), match="--plot"
    )


MALFORMED = {
    "ragged.csv": "1,2,3\n4,5\n",
    "words.csv": "1,2\nx,y\n",
    "empty.csv": "",
    "empty.json": "[]",
    "ragged.json": "[[1, 2], [3]]",
    "text.json": '["a"]',
    "broken.json": "[[1, 2",
    "junk.npy": "not numpy",
    "x.txt": "1,2",
    "nan.json": "[1, NaN, 2]",
    "inf.csv": "1,2\n3,1e400\n",
    "deep.json": "[" * 100_000 + "1" + "]" * 100_000,
    "hugeint.json": "[1, " + "9" * 400 + "]",
}


@pytest.mark.parametrize("name", [*sorted(MALFORMED), "pickled.npy"])
@pytest.mark.parametrize("command", ["check", "explain", "vectors"])
def test_malformed_input_exits_2_in_one_line(capsys, tmp_path, name, command):
    path = tmp_path / name
    if name == "pickled.npy":
        np.save(path, np.array([object()], dtype=object), allow_pickle=True)
    else:
        path.write_text(MALFORMED[name])
    err = assert_usage_error(capsys, command, "--input", str(path))
    assert str(path) in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["check", "--axes", "a"], "--axes"),
        (["check", "--axes", "2"], "out of range"),
        (["check", "--axes", "0,0"], "twice"),
        (["check", "--eps", "-1"], "eps"),
        (["check", "--eps", "abc"], "invalid float"),
        (["check", "--eps", "0", "--input", "{const}"], "zero variance"),
        (["check", "--ddof", "64"], "ddof"),
        (["check", "--eps-mode", "middle"], "invalid choice"),
        (["check", "--mode", "fast"], "invalid choice"),
        (["check", "--dy", "{short}"], "--dy"),
        (["check", "--no-such-flag"], "unrecognized"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_in_one_line(capsys, tmp_path, argv, match):
    const = tmp_path / "const.json"
    const.write_text("[[1, 1], [1, 1]]")
    short = tmp_path / "short.json"
    short.write_text("[1, 2, 3]")
    argv = [a.replace("{const}", str(const)).replace("{short}", str(short)) for a in argv]
    assert_usage_error(capsys, *argv, match=match)


def test_no_command_help_and_version(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "demo" in err
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("normgrad ")
    code, out, _ = run(capsys, "check", "--help")
    assert code == 0 and "--forward" in out


def test_rich_on_a_terminal_plain_under_no_color(capsys, monkeypatch):
    pytest.importorskip("rich")
    plain = run(capsys, "explain", "--shape", "2x2")[1]
    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert _output.Printer().console is None
    assert run(capsys, "explain", "--shape", "2x2")[1] == plain
    monkeypatch.delenv("NO_COLOR")
    assert _output.Printer().console is not None
    code, fancy, _ = run(capsys, "explain", "--shape", "2x2")
    assert code == 0 and "μ = mean(x)" in fancy and "PASS" in fancy


def test_plain_without_rich(capsys, monkeypatch):
    monkeypatch.setattr(_output, "stdout_is_terminal", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import fails: no rich
    assert _output.Printer().console is None


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("rich")
    with _output.progress(True, "x") as cb:
        assert cb is None  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    with _output.progress(True, "x") as cb:
        assert cb is not None
        for i in range(0, 501, 50):
            cb(i, 500)
    with _output.progress(False, "x") as cb:
        assert cb is None


def test_long_check_reports_progress(monkeypatch, capsys):
    calls = []
    real = _output.progress

    def spy(enabled, description):
        calls.append(enabled)
        return real(enabled, description)

    monkeypatch.setattr(_output, "progress", spy)
    assert run(capsys, "check", "--shape", "16x16")[0] == 0
    assert calls == [True]
    assert run(capsys, "check", "--shape", "4x4", "--json")[0] == 0
    assert calls == [True, False]  # --json: stdout stays one document, no bar


def test_python_dash_m(tmp_path):
    tree = str(Path(normgrad.__file__).parents[1])  # the normgrad under test, not an installed one
    proc = subprocess.run(
        [sys.executable, "-m", "normgrad", "explain", "--shape", "2x2", "--json"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "PYTHONPATH": tree},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nodes"][0]["name"] == "x"
