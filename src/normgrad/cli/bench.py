"""`normgrad bench`: the benchmark runner, which parses its own arguments.

`normgrad.cli.main` hands it everything after `bench` unparsed; the runner is imported only
then (`_runner`, the one place that names it).
"""

from __future__ import annotations

import argparse
import importlib
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


def _runner() -> Any:
    """The benchmark runner module: `add_arguments(parser)` and `run(args) -> int`."""
    try:
        return importlib.import_module("normgrad._bench")
    except ImportError as e:
        raise NormgradError(
            f"the benchmark runner is not available ({e}); reinstall normgrad from a full checkout."
        ) from None


def run(rest: list[str]) -> int:
    """Parse `rest` (the arguments after `bench`) with the runner's options and run it."""
    runner = _runner()
    parser = Parser(prog=f"{PROG} bench", description="normgrad benchmarks")
    runner.add_arguments(parser)
    args = parse(parser, rest)
    if isinstance(args, int):
        return args
    return int(runner.run(args))
