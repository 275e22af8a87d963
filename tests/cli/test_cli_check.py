"""`normgrad check`: normgrad's op and the user's own forward/backward, in-process."""

import json
import sys

import numpy as np
import pytest
from _cli_helpers import assert_usage_error, run, run_json

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
