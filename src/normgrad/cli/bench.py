"""`normgrad bench`: the benchmark suite of a source checkout (`benchmarks/`), which parses
its own arguments.

`normgrad.cli.main` hands it everything after `bench` unparsed. The suite is not part of the
installed package; `_runner` (the one place that names it) finds it next to `src/` and
imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .._errors import NormgradError
from ._options import PROG, Parser, parse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Only for `normgrad --help`: `main` never parses bench's arguments itself."""
    subparsers.add_parser(
        "bench",
        help="benchmarks (see normgrad bench --help)",
        add_help=False,
        prefix_chars="\0",  # every argument goes to the benchmark runner's own parser
    ).add_argument("rest", nargs=argparse.REMAINDER)


SUITE = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_kernels.py"


def _runner() -> Any:
    """The benchmark suite's module: `add_arguments(parser)` and `run(args) -> int`."""
    spec = importlib.util.spec_from_file_location("normgrad_bench_kernels", SUITE)
    if not SUITE.is_file() or spec is None or spec.loader is None:
        raise NormgradError(
            f"the benchmark suite is not here ({SUITE} is missing): it ships with the source "
            "checkout, not the installed package; run normgrad bench (or make bench) there."
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def run(rest: list[str]) -> int:
    """Parse `rest` (the arguments after `bench`) with the runner's options and run it."""
    runner = _runner()
    parser = Parser(prog=f"{PROG} bench", description="normgrad benchmarks")
    runner.add_arguments(parser)
    args = parse(parser, rest)
    if isinstance(args, int):
        return args
    return int(runner.run(args))
