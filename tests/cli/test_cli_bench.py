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
