"""The parser and the options several commands share, and turning them into the op's input:
x (random or from a file), dy, the axes, the op's keyword arguments, weight and bias."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from .._errors import NormgradError

PROG = "normgrad"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code where argparse stops (--help, --version: 0;
    a usage error: 2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2


def _seed(text: str) -> int:
    """argparse type: a seed is an int >= 0 (NumPy refuses negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an int >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text}: give an int >= 0")
    return value


def add_seed(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    p.add_argument("--seed", type=_seed, default=0, help=f"seed of {what} (default 0)")


def add_shared(
    p: argparse.ArgumentParser,
    *,
    dy: str,
    json_help: str = "print one JSON document",
    dtype: str | None = None,
    affine: str | None = None,
) -> None:
    """Options several subcommands share: --dy (its default said by `dy`), --json, and
    optionally --dtype and --affine (with their help texts)."""
    if dtype is not None:
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help=dtype)
    if affine is not None:
        p.add_argument("--affine", action="store_true", help=affine)
    p.add_argument("--dy", metavar="FILE|ones|random", help=f"cotangent on y: {dy}")
    p.add_argument("--json", action="store_true", help=json_help)


def add_op_options(p: argparse.ArgumentParser, *, default_shape: str) -> None:
    g = p.add_argument_group("the op and its input")
    g.add_argument(
        "--axes",
        default="all",
        help="axes to normalize over: 'all' (default, the whole array) or ints like 1 or 0,2",
    )
    g.add_argument("--eps", type=float, default=1e-5, help="epsilon (default 1e-5)")
    g.add_argument(
        "--eps-mode",
        choices=("inside", "outside"),
        default="inside",
        help="inside: (x-mu)/sqrt(var+eps) (default); outside: (x-mu)/(sqrt(var)+eps)",
    )
    g.add_argument(
        "--ddof", type=float, default=0, help="variance divides by n - ddof (default 0: biased)"
    )
    g.add_argument(
        "--shape",
        default=default_shape,
        help=f"shape of the random input, like 8x8 (default {default_shape})",
    )
    add_seed(g, "the random input")
    g.add_argument(
        "--input",
        metavar="FILE",
        help="read x from a .npy, .npz[:name], .csv or .json file instead of a random one",
    )


def add_check_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checker")
    g.add_argument(
        "--mode",
        choices=("auto", "full", "probe"),
        default="auto",
        help="full: dense Jacobian; probe: random directions; auto (default): full up to 1024 "
        "elements",
    )
    g.add_argument("--step", type=float, help="finite-difference step (default: chosen per x)")
    g.add_argument("--rtol", type=float, help="relative tolerance (default: the checker's)")
    g.add_argument("--atol", type=float, help="absolute tolerance (default: the checker's)")
    g.add_argument("--plot", metavar="FILE.png", help="save the checker's picture (matplotlib)")


def parse_axes(text: str) -> int | tuple[int, ...] | None:
    """`"all"` -> None; `"1"` -> 1; `"0,2"` -> (0, 2)."""
    t = text.strip().lower()
    if t in ("all", "none", ""):
        return None
    try:
        items = tuple(int(p) for p in t.replace(" ", "").split(","))
    except ValueError:
        raise NormgradError(
            f"--axes {text!r} is not a list of ints; write all, 1, -1 or 0,2."
        ) from None
    return items[0] if len(items) == 1 else items


def op_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ddof: float = int(args.ddof) if float(args.ddof).is_integer() else args.ddof
    return {"eps": args.eps, "eps_mode": args.eps_mode, "ddof": ddof}


def input_x(args: argparse.Namespace, dtype: str = "float64") -> np.ndarray:
    from .._io import load_array, parse_shape

    if args.input:
        x = load_array(args.input)
    else:
        shape = parse_shape(args.shape)
        if math.prod(shape) > 10_000_000:
            raise NormgradError(f"--shape {args.shape} is too large; use at most 1e7 elements.")
        x = np.random.default_rng(args.seed).standard_normal(shape)
    return x.astype(dtype)


def input_dy(args: argparse.Namespace, x: np.ndarray, default: str) -> np.ndarray:
    from .._io import load_array

    choice = getattr(args, "dy", None) or default
    if choice == "ones":
        return np.ones_like(x)
    if choice == "random":
        return np.random.default_rng(args.seed + 1).standard_normal(x.shape).astype(x.dtype)
    dy = load_array(choice)
    if dy.shape != x.shape:
        raise NormgradError(
            f"--dy {choice} has shape {dy.shape} but x has shape {x.shape}; give one value "
            "per element of y."
        )
    return dy.astype(x.dtype)


def options_record(args: argparse.Namespace, x: np.ndarray, axes: Any) -> dict[str, Any]:
    """The op's options as the JSON output records them."""
    return {
        "shape": list(x.shape),
        "axes": "all" if axes is None else ([axes] if isinstance(axes, int) else list(axes)),
        **op_kwargs(args),
        "seed": args.seed,
        "input": args.input,
        "dtype": str(x.dtype),
    }


def affine_params(x: np.ndarray, axes: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random weight and bias of the reduced axes' shape (size 1 on the kept axes)."""
    from .._axes import normalize_axes

    ax = normalize_axes(axes, x.ndim)
    shape = tuple(s if i in ax else 1 for i, s in enumerate(x.shape))
    rng = np.random.default_rng(seed + 2)
    w = (1.0 + 0.5 * rng.standard_normal(shape)).astype(x.dtype)
    b = (0.5 * rng.standard_normal(shape)).astype(x.dtype)
    return w, b
