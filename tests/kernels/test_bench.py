"""The benchmark suite (benchmarks/bench_kernels.py) runs end to end (timings unchecked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_kernels as _bench


def test_bench_runner_smoke(tmp_path):
    """The benchmark runner works end to end on one tiny size (timings are not checked)."""
    args = _bench.parse_args(
        ["--sizes", "1000", "--repeat", "1", "--layouts", "whole", "--dtypes", "float64",
         "--impls", "fused,fused_out,fused_mapped,generic,numpy", "--out", str(tmp_path),
         "--no-plot", "--no-accuracy", "--models", "none", "--plain"]
    )  # fmt: skip
    assert _bench.run(args) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"fused", "fused_out", "fused_mapped", "generic", "numpy"}
    assert data["triad_bytes_per_s"] > 0
    assert all(r["median_s"] > 0 for r in data["results"])
    table = (tmp_path / "bench.md").read_text()
    assert "| fused % roof | out % roof | mapped % roof | fused vs generic |" in table


@pytest.mark.serial  # the two pool threads must run at once: in the parallel pass, sharing
# 2 cores with another test process, no hand-off completed in 4 tries once (None)
def test_bench_records_the_thread_hand_off(tmp_path):
    """Cases from HANDOFF_MIN elements record how long a cache line takes between the two
    pool threads, and the tables show it per row."""
    import numba

    h = _bench.measure_handoff(2000)
    if numba.config.NUMBA_NUM_THREADS < 2:
        assert h is None
    else:
        assert h is not None and 0 < h < 1e6
    args = _bench.parse_args(
        ["--sizes", str(_bench.HANDOFF_MIN), "--repeat", "1", "--layouts", "rows",
         "--dtypes", "float32", "--passes", "fwd", "--impls", "fused", "--out", str(tmp_path),
         "--no-plot", "--no-accuracy", "--no-startup", "--models", "none", "--plain"]
    )  # fmt: skip
    assert _bench.run(args) == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert (row["handoff_ns"] is None) == (numba.config.NUMBA_NUM_THREADS < 2)
    table = (tmp_path / "bench.md").read_text()
    assert "| hand-off ns |" in table


def test_rms_model_cases_run_against_rms_norm():
    """The RMSNorm model cases (center=False, weight, no bias) check normgrad and
    F.rms_norm against the float64 reference before timing them (timings unchecked)."""
    pytest.importorskip("torch")
    import bench_models

    cases = bench_models.select("rms64,rmswhole")
    assert [c.center for c in cases] == [False, False]
    rows = bench_models.run_models(cases, ["float32"], ["fwdbwd"], 1, 1e10, False)
    by = {(r["case"], r["impl"]): r for r in rows if r["passes"] == "fwdbwd"}
    for case in cases:
        for impl in ("normgrad", "torch"):
            assert by[case.name, impl]["max_rel_err"] < 1e-5 and by[case.name, impl]["median_s"] > 0
    assert "| RMSNorm 64x768 |" in bench_models.format_models(rows)


def test_masked_model_cases_report_their_ratio_to_the_unmasked_ones():
    """The masked LayerNorm cases run normgrad with mask= (checked against the float64
    generic reference) and report their time over the unmasked case's (timings unchecked)."""
    import bench_models

    cases = bench_models.select("ln256,lnmask256")
    rows = bench_models.run_models(cases, ["float32"], ["fwdbwd"], 1, 1e10, False)
    masked = [r for r in rows if r["case"] == "LayerNorm masked 256x1024"]
    assert [r["impl"] for r in masked] == ["normgrad"] and masked[0]["max_rel_err"] < 1e-5
    report = bench_models.format_models(rows)
    assert "### Masked over unmasked (normgrad)" in report
    assert "| LayerNorm masked 256x1024 | float32 | fwdbwd |" in report


def test_model_cases_are_also_timed_between_torch_ops():
    """With fwdbwd and torch present, the torch implementations are timed between torch ops
    (`BETWEEN`), their results checked against PyTorch's op in float64 first; normgrad's
    NumPy call has no such pass (timings unchecked)."""
    pytest.importorskip("torch")
    import bench_models

    rows = bench_models.run_models(
        bench_models.select("ln32"), ["float32"], ["fwdbwd"], 1, 1e10, False
    )
    between = {r["impl"]: r for r in rows if r["passes"] == bench_models.BETWEEN}
    assert sorted(between) == ["normgrad.torch", "torch"]
    assert all(r["max_rel_err"] < 1e-5 and r["median_s"] > 0 for r in between.values())
    report = bench_models.format_models(rows)
    assert f"### float32, {bench_models.BETWEEN}" in report
    assert not [r for r in rows if r["passes"] == bench_models.BETWEEN and r["impl"] == "normgrad"]
