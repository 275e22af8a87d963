"""`normgrad demo`: the question's wrong gradient reproduced, diagnosed and fixed."""

import pytest
from _cli_helpers import run, run_json


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
