"""`normgrad vectors`: reference vectors in JSON, CSV and NPZ."""

import json

import numpy as np
import pytest
from _cli_helpers import assert_usage_error, run, run_json
from _fd import fd_jacobian

from normgrad import normalize


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
