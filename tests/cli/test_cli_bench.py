"""`normgrad bench`: wired to the benchmark runner, imported only when asked for."""

import subprocess
import sys
import textwrap

from _cli_helpers import assert_usage_error, run


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
                heavy = [m for m in ("normgrad_bench_kernels", "rich", "matplotlib", "torch", "jax")
                         if m in sys.modules]
                assert not heavy, heavy
                """
            ),
        ],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    code, out, _ = run(capsys, "bench", "--help")  # from this checkout: the suite is here
    assert code == 0 and "usage: normgrad bench" in out


def test_bench_without_the_suite_says_where_it_is(capsys, monkeypatch, tmp_path):
    from normgrad.cli import bench

    monkeypatch.setattr(bench, "SUITE", tmp_path / "bench_kernels.py")
    assert_usage_error(capsys, "bench", match="source checkout")
