"""`normgrad explain`: the reverse sweep printed node by node, --json and --compare."""

import json

import numpy as np
from _cli_helpers import assert_usage_error, run, run_json
from _fd import fd_jacobian

from normgrad import normalize


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
