"""The `normgrad` command line: demo, check, explain, vectors, bench.

Exit codes: 0 ok, 1 a gradient check failed, 2 a usage or input error (one line on stderr
that says how to fix it). Output uses rich on a terminal, plain text otherwise or under
NO_COLOR; `--json` prints one JSON document instead. See docs/cli.md.

One module per command (`demo.py`, `check.py`, `explain.py`, `vectors.py`, `bench.py`), each
with `add_parser(subparsers)` and `run(args) -> int`; the options they share and the input
they build are in `_options.py`, printing in `_output.py`, running the checker in
`_checking.py`. This file assembles the parser and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .._errors import NormgradError
from . import bench, check, demo, explain, vectors
from ._options import PROG, Parser, parse

__all__ = ["build_parser", "main"]

COMMANDS = {"demo": demo, "check": check, "explain": explain, "vectors": vectors}


def build_parser() -> argparse.ArgumentParser:
    """The `normgrad` argument parser (subcommands demo, check, explain, vectors, bench)."""
    from .. import __version__

    parser = Parser(
        prog=PROG,
        description="Mean-variance normalization with exact derivatives, and a gradient "
        "checker that says what is wrong.",
    )
    parser.add_argument("--version", action="version", version=f"normgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in (*COMMANDS.values(), bench):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 check failed, 2 usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark runner parses its own arguments
        return _guard(lambda: bench.run(argv[1:]))
    parser = build_parser()
    args = parse(parser, argv)  # --help, --version and usage errors end here
    if isinstance(args, int):
        return args
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _guard(lambda: COMMANDS[args.command].run(args))


def _guard(run: Callable[[], int]) -> int:
    """`run()`'s exit code; user errors become one line on stderr and exit 2."""
    try:
        return run()
    except NormgradError as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `normgrad explain | head`: the reader left, stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
