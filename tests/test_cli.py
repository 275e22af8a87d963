"""The `normgrad` command line, run in-process: every subcommand, exit codes, JSON, errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _fd import fd_jacobian

from normgrad import cli, normalize
from normgrad.cli import _output

MINE = """
from dataclasses import dataclass

import numpy as np


@dataclass
class Config:  # a dataclass needs its module registered while the file is imported
    eps: float = 1e-5


EPS = Config().eps

def forward(x):
    mu = x.mean()
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean() + EPS)

def backward_wrong(x, dy):  # the question's mistake: only the diagonal of the Jacobian
    mu = x.mean()
    return dy / np.sqrt(((x - mu) ** 2).mean() + EPS)

def backward_right(x, dy):
    mu = x.mean()
    s = np.sqrt(((x - mu) ** 2).mean() + EPS)
    xh = (x - mu) / s
    return (dy - dy.mean() - xh * (dy * xh).mean()) / s

def jvp_right(x, tx):
    return backward_right(x, tx)  # the Jacobian is symmetric

def jvp_wrong(x, tx):
    return 2 * backward_right(x, tx)

def backward_raises(x, dy):
    raise RuntimeError("not implemented yet\\nsecond line")

def backward_inf(x, dy):
    dx = backward_right(x, dy)
    dx.flat[0] = np.inf
    return dx

def first_two_squared(x):  # y is not shaped like x
    return x.ravel()[:2] ** 2

def first_two_backward(x, dy):
    dx = np.zeros(x.size)
    dx[:2] = 2 * x.ravel()[:2] * dy
    return dx.reshape(x.shape)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def mine(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(MINE)
    return path


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    return code, json.loads(out), err


def assert_usage_error(capsys, *argv, match=None):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    if match is not None:
        assert match in err, err
    return err


# ------------------------------------------------------------------------------------- demo


def test_demo_reproduces_diagnoses_and_fixes(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "diagonal" in out
    assert "max |analytic − numerical| = 3.17" in out
    assert "μ path" in out and "σ² path" in out
    assert out.count("PASS") >= 2 and "FAIL" in out


def test_demo_json_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    code, doc, _ = run_json(capsys, "demo", "--plot", str(png))
    assert code == 0 and doc["ok"] is True
    wrong, right = doc["question_gradient"], doc["normgrad_gradient"]
    assert wrong["ok"] is False and wrong["max_abs_error"] == pytest.approx(3.17, abs=0.01)
    assert "diagonal" in [d["kind"] for d in wrong["diagnosis"]]
    assert right["ok"] is True and right["max_abs_error"] < 1e-6
    assert doc["forward_max_abs_diff"] < 1e-12
    assert {d["node"] for d in doc["departures"]} >= {"var", "mu"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ check


def test_check_op_default_passes(capsys):
    code, out, _ = run(capsys, "check")
    assert code == 0 and "PASS  dx" in out


@pytest.mark.parametrize(
    "flags",
    [
        ["--axes", "1", "--eps", "1e-3", "--eps-mode", "outside", "--ddof", "1"],
        ["--axes=-1", "--shape", "3x4x5", "--seed", "7"],
        ["--axes", "0,2", "--shape", "2x3x4", "--mode", "probe"],
        ["--dtype", "float32", "--shape", "4x4"],
        ["--shape", "6", "--step", "1e-4", "--rtol", "1e-6", "--atol", "1e-9", "--dy", "random"],
    ],
)
def test_check_op_flags_json(capsys, flags):
    code, doc, _ = run_json(capsys, "check", *flags)
    assert code == 0 and doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == ["dx"]
    if "probe" in flags:
        assert doc["checks"][0]["mode"] == "probe"
    if "float32" in flags:
        assert doc["options"]["dtype"] == "float32"
    if "outside" in flags:
        assert doc["options"]["eps_mode"] == "outside" and doc["options"]["ddof"] == 1


def test_check_op_affine_checks_weight_and_bias(capsys):
    code, doc, _ = run_json(capsys, "check", "--affine", "--axes", "1", "--shape", "3x5")
    assert code == 0
    assert [c["name"] for c in doc["checks"]] == ["dx", "dweight", "dbias"]
    assert doc["checks"][1]["input_shapes"] == [[1, 5]]


def test_check_op_on_an_input_file(capsys, tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 3))
    (tmp_path / "x.json").write_text(json.dumps(x.tolist()))
    code, doc, _ = run_json(capsys, "check", "--input", str(tmp_path / "x.json"))
    assert code == 0 and doc["options"]["shape"] == [3, 3]
    np.testing.assert_allclose(
        doc["checks"][0]["analytic"], doc["checks"][0]["numerical"], atol=1e-7
    )


def test_check_user_wrong_backward_fails_with_diagnosis(capsys, mine):
    code, out, _ = run(
        capsys, "check", "--forward", f"{mine}:forward", "--backward", f"{mine}:backward_wrong"
    )
    assert code == 1
    assert "diagnosis: diagonal" in out and "gradient check failed" in out


def test_check_user_right_backward_passes(capsys, mine):
    code, out, _ = run(
        capsys, "check", "--forward", f"{mine}:forward", "--backward", f"{mine}:backward_right"
    )
    assert code == 0 and "PASS" in out and "FAIL" not in out


def test_check_user_json_and_jvp(capsys, mine):
    base = ["check", "--forward", f"{mine}:forward", "--backward", f"{mine}:backward_right"]
    code, doc, _ = run_json(capsys, *base, "--jvp", f"{mine}:jvp_right", "--shape", "3x3")
    assert code == 0 and doc["ok"] is True and doc["options"]["jvp"].endswith("jvp_right")
    code, doc, _ = run_json(capsys, *base, "--jvp", f"{mine}:jvp_wrong", "--shape", "3x3")
    assert code == 1 and doc["ok"] is False
    assert doc["checks"][0]["diagnosis"][0]["kind"] != "ok"


def test_check_user_module_spec(capsys, mine, monkeypatch):
    monkeypatch.syspath_prepend(str(mine.parent))
    code, doc, _ = run_json(
        capsys, "check", "--forward", "mine:forward", "--backward", "mine:backward_wrong"
    )
    assert code == 1 and "diagonal" in [d["kind"] for d in doc["checks"][0]["diagnosis"]]
    sys.modules.pop("mine", None)


def test_check_plot(capsys, mine, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    code, out, _ = run(
        capsys,
        "check",
        "--forward",
        f"{mine}:forward",
        "--backward",
        f"{mine}:backward_wrong",
        "--shape",
        "4x4",
        "--plot",
        str(png),
    )
    assert code == 1 and png.read_bytes()[:4] == b"\x89PNG" and str(png) in out


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--forward", "{m}:forward"], "needs both"),
        (["--backward", "{m}:backward_right"], "needs both"),
        (["--forward", "{m}", "--backward", "{m}:backward_right"], "FILE.py:function"),
        (["--forward", "{m}:nope", "--backward", "{m}:backward_right"], "no attribute 'nope'"),
        (["--forward", "{m}:NOT_A_FUNCTION", "--backward", "{m}:forward"], "not a function"),
        (["--forward", "/no/such.py:f", "--backward", "{m}:forward"], "no such file"),
        (["--forward", "no_such_module_xyz:f", "--backward", "{m}:forward"], "cannot import"),
        (["--forward", "{m}:forward", "--backward", "{m}:backward_raises"], "RuntimeError"),
        (["--forward", "{m}:forward", "--backward", "{m}:backward_right", "--affine"], "--affine"),
    ],
)
def test_check_user_errors_exit_2(capsys, mine, args, match):
    argv = [a.replace("{m}", str(mine)) for a in args]
    assert_usage_error(capsys, "check", *argv, match=match)


def test_check_user_backward_returning_inf_fails(capsys, mine):
    base = ["check", "--forward", f"{mine}:forward", "--backward", f"{mine}:backward_inf"]
    code, out, _ = run(capsys, *base)
    assert code == 1 and "PASS  dx" not in out and "nonfinite" in out and "(0, 0)" in out
    code, doc, _ = run_json(capsys, *base)
    assert code == 1 and doc["ok"] is False and doc["checks"][0]["max_abs_error"] is None


def test_check_user_forward_nan_at_x_exits_2(capsys, mine, tmp_path):
    (tmp_path / "neg.json").write_text("[[1, -1], [2, 3]]")
    err = assert_usage_error(
        capsys,
        "check",
        "--forward",
        "numpy:log",
        "--backward",
        f"{mine}:backward_right",
        "--input",
        str(tmp_path / "neg.json"),
        match="f(x) is NaN or Inf",
    )
    assert "(0, 1)" in err


def test_check_user_dy_for_y_not_shaped_like_x(capsys, mine, tmp_path):
    base = ["check", "--forward", f"{mine}:first_two_squared"]
    base += ["--backward", f"{mine}:first_two_backward", "--shape", "5"]
    (tmp_path / "dy2.json").write_text("[0.5, -2]")
    for dy in (str(tmp_path / "dy2.json"), "ones", "random"):
        code, doc, _ = run_json(capsys, *base, "--dy", dy)
        assert code == 0 and doc["ok"] is True, (dy, doc)
    (tmp_path / "dy5.json").write_text("[1, 2, 3, 4, 5]")
    assert_usage_error(capsys, *base, "--dy", str(tmp_path / "dy5.json"), match="shape of y")


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


def test_check_op_at_zeros_passes(capsys, tmp_path):
    (tmp_path / "zero.json").write_text("[0, 0, 0, 0]")
    code, out, _ = run(capsys, "check", "--input", str(tmp_path / "zero.json"))
    assert code == 0 and "PASS  dx" in out and "FAIL" not in out


def test_check_op_affine_checks_the_jvp_too(capsys, monkeypatch):
    import normgrad._ops as ops

    right = ops.normalize_jvp
    monkeypatch.setattr(
        ops, "normalize_jvp", lambda *a, **k: (lambda y, t: (y, 2 * t))(*right(*a, **k))
    )
    code, doc, _ = run_json(capsys, "check", "--affine", "--axes", "1", "--shape", "3x4")
    assert code == 1
    for check in doc["checks"]:
        assert check["ok"] is False and check["diagnosis"][-1]["message"].startswith("jvp:")


def test_check_user_file_with_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x:\n")
    assert_usage_error(
        capsys, "check", "--forward", f"{bad}:f", "--backward", f"{bad}:f", match="SyntaxError"
    )


# ---------------------------------------------------------------------------------- explain


def test_explain_prints_every_node_and_the_question(capsys):
    code, out, _ = run(capsys, "explain")
    assert code == 0
    for text in ("μ = mean(x)", "d = x − μ", "σ² = Σ d² / m", "sqrt(σ² + ε)", "y = d / s"):
        assert text in out
    assert "finite differences" in out and out.count("PASS") == 6 and "FAIL" not in out
    assert "where the question's derivation departs" in out
    assert "∂σ²/∂d_i = 2 d_i / m" in out


def test_explain_json(capsys, tmp_path):
    x = np.random.default_rng(5).standard_normal((2, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "dy.npy", x[::-1])
    code, doc, _ = run_json(
        capsys,
        "explain",
        "--input",
        str(tmp_path / "x.npy"),
        "--dy",
        str(tmp_path / "dy.npy"),
        "--axes",
        "1",
        "--eps-mode",
        "outside",
    )
    assert code == 0 and doc["departures"] == [] and doc["first_mismatch"] is None
    nodes = {n["name"]: n for n in doc["nodes"]}
    ctx_dx = np.asarray(nodes["x"]["adjoint"])
    jac = fd_jacobian(lambda z: normalize(z, 1, eps_mode="outside"), x)
    np.testing.assert_allclose(ctx_dx, np.tensordot(x[::-1], jac, axes=2), atol=1e-7)
    assert doc["options"]["axes"] == [1]


def test_explain_large_input_summarizes(capsys):
    code, out, _ = run(capsys, "explain", "--shape", "10x10", "--dy", "random")
    assert code == 0 and "shape 10x10: min" in out


def test_explain_large_offset_small_spread_agrees(capsys, tmp_path):
    x = 1e4 + 1e-2 * np.random.default_rng(3).standard_normal((3, 4))
    np.save(tmp_path / "shift.npy", x)
    code, out, _ = run(capsys, "explain", "--input", str(tmp_path / "shift.npy"), "--dy", "random")
    assert code == 0 and out.count("PASS") == 6 and "FAIL" not in out


def test_explain_compare_refuses_duplicates_and_complex(capsys, tmp_path):
    (tmp_path / "dup.json").write_text('{"mu": 1, "mean": 2}')
    assert_usage_error(capsys, "explain", "--compare", str(tmp_path / "dup.json"), match="once")
    np.savez(tmp_path / "c.npz", mu=np.array([1 + 1j]))
    assert_usage_error(capsys, "explain", "--compare", str(tmp_path / "c.npz"), match="complex")


def test_explain_refuses_huge_input(capsys):
    assert_usage_error(capsys, "explain", "--shape", "100x100", match="at most")


# ---------------------------------------------------------------------------------- vectors


def test_vectors_json_are_correct_and_reproducible(capsys):
    code, out, _ = run(capsys, "vectors", "--shape", "3x4", "--axes", "1", "--seed", "3")
    assert code == 0
    _, out2, _ = run(capsys, "vectors", "--shape", "3x4", "--axes", "1", "--seed", "3")
    assert out == out2
    doc = json.loads(out)
    assert doc["format"] == "normgrad-vectors" and doc["options"]["axes"] == [1]
    a = {k: np.asarray(v["data"]) for k, v in doc["arrays"].items()}
    assert set(a) == {"x", "dy", "y", "mean", "var", "dx", "jacobian"}
    # Independent references: the formula by hand, and finite differences.
    mu = a["x"].mean(axis=1, keepdims=True)
    var = ((a["x"] - mu) ** 2).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(a["mean"], mu, rtol=1e-15)
    np.testing.assert_allclose(a["var"], var, rtol=1e-14)
    np.testing.assert_allclose(a["y"], (a["x"] - mu) / np.sqrt(var + 1e-5), rtol=1e-13)
    jac = fd_jacobian(lambda z: normalize(z, 1), a["x"])
    np.testing.assert_allclose(a["jacobian"], jac, atol=1e-8)
    np.testing.assert_allclose(a["dx"], np.tensordot(a["dy"], jac, axes=2), atol=1e-8)


def test_vectors_other_seed_differs(capsys):
    _, out1, _ = run(capsys, "vectors", "--seed", "1")
    _, out2, _ = run(capsys, "vectors", "--seed", "2")
    assert json.loads(out1)["arrays"]["x"] != json.loads(out2)["arrays"]["x"]


def test_vectors_csv_npz_affine_and_options(capsys, tmp_path):
    from normgrad._io import read_vectors_csv

    common = ["vectors", "--shape", "2x5", "--affine", "--eps", "0.01", "--ddof", "1"]
    code, doc, _ = run_json(capsys, *common, "-o", str(tmp_path / "v.csv"))
    assert code == 0 and doc["format"] == "csv"
    assert doc["arrays"]["weight"] == [2, 5] and doc["arrays"]["jacobian"] == [2, 5, 2, 5]
    options, arrays = read_vectors_csv(tmp_path / "v.csv")
    assert options["eps"] == 0.01 and options["ddof"] == 1 and options["affine"] is True
    y_ref = normalize(arrays["x"], eps=0.01, ddof=1, weight=arrays["weight"], bias=arrays["bias"])
    np.testing.assert_allclose(arrays["y"], y_ref, rtol=1e-15)

    code, out, _ = run(capsys, *common, "--jacobian", "no", "-o", str(tmp_path / "v.npz"))
    assert code == 0 and "wrote npz vectors" in out
    with np.load(tmp_path / "v.npz", allow_pickle=False) as z:
        assert "jacobian" not in z.files and {"dweight", "dbias"} <= set(z.files)
        assert json.loads(str(z["__options__"]))["eps"] == 0.01
        np.testing.assert_array_equal(z["x"], arrays["x"])  # same seed, same data


def test_vectors_jacobian_auto_and_dtype(capsys):
    code, out, _ = run(capsys, "vectors", "--shape", "9x9")
    assert code == 0 and "jacobian" not in json.loads(out)["arrays"]
    _, out, _ = run(capsys, "vectors", "--shape", "9x9", "--jacobian", "yes", "--dtype", "float32")
    arrays = json.loads(out)["arrays"]
    assert arrays["jacobian"]["shape"] == [9, 9, 9, 9] and arrays["y"]["dtype"] == "float32"


def test_vectors_format_flag_to_stdout(capsys):
    code, out, _ = run(capsys, "vectors", "--format", "csv")
    assert code == 0 and out.startswith("# format: normgrad-vectors")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["vectors", "--format", "npz"], "--output"),
        (["vectors", "-o", "out.txt"], "suffix"),
        (["vectors", "--shape", "3xq"], "shape"),
        (["vectors", "--shape", "0x3"], "size"),
    ],
)
def test_vectors_errors(capsys, argv, match):
    assert_usage_error(capsys, *argv, match=match)


# ---------------------------------------------------------------------------- input errors


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


# ---------------------------------------------------------------------- output and progress


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


def test_bench_is_lazy_and_wired(capsys):
    code = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from normgrad import cli
                cli.build_parser()
                heavy = [m for m in ("normgrad._bench", "rich", "matplotlib", "torch", "jax")
                         if m in sys.modules]
                assert not heavy, heavy
                """
            ),
        ],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    try:
        import normgrad._bench  # noqa: F401
    except ImportError:
        assert_usage_error(capsys, "bench", match="benchmark runner")
    else:
        code, out, _ = run(capsys, "bench", "--help")
        assert code == 0 and "usage: normgrad bench" in out


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "normgrad", "explain", "--shape", "2x2", "--json"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nodes"][0]["name"] == "x"


def test_explain_compare_names_the_first_difference(capsys, tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3))
    np.save(tmp_path / "x.npy", x)
    _, doc, _ = run_json(capsys, "explain", "--input", str(tmp_path / "x.npy"))
    adj = {n["name"]: n["adjoint"] for n in doc["nodes"]}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"var": adj["var"], "mu": adj["mu"], "dx": adj["x"]}))
    code, out, _ = run(
        capsys, "explain", "--input", str(tmp_path / "x.npy"), "--compare", str(good)
    )
    assert code == 0 and "agree with the sweep" in out
    bad = tmp_path / "bad.npz"
    np.savez(bad, var=np.asarray(adj["var"]), mu=np.asarray(adj["mu"]) * 0, x=np.zeros((2, 3)))
    args = ["explain", "--input", str(tmp_path / "x.npy"), "--compare", str(bad)]
    code, doc, _ = run_json(capsys, *args)
    assert code == 1 and doc["first_difference"] == "mu"
    assert [c["ok"] for c in doc["comparison"]] == [True, False, True]
    code, out, _ = run(capsys, *args)
    assert code == 1 and "first difference at μ" in out
    (tmp_path / "list.json").write_text("[1, 2]")
    assert_usage_error(capsys, "explain", "--compare", str(tmp_path / "list.json"), match="object")
