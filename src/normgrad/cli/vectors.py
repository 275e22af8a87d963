"""`normgrad vectors`: reference test vectors for porting the op, with the options that made
them (the file formats are `normgrad._io`'s)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ._options import (
    add_op_options,
    add_shared,
    affine_params,
    input_dy,
    input_x,
    op_kwargs,
    options_record,
    parse_axes,
)
from ._output import Printer, print_json

JACOBIAN_AUTO_MAX = 64


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "vectors",
        help="reference test vectors (x, dy, y, mean, var, dx, Jacobian) as JSON, CSV or NPZ",
        description="Write reference vectors for porting the op: x, dy, y, mean, var, dx "
        "(weight, bias, dweight, dbias with --affine; the Jacobian for small inputs), with "
        "every option recorded in the file.",
    )
    add_op_options(p, default_shape="3x4")
    add_shared(
        p,
        dy="a file, ones or random (default: random, seed + 1)",
        json_help="with --output: print a JSON summary",
        dtype="dtype of x and y",
        affine="include random weight and bias",
    )
    p.add_argument(
        "--jacobian",
        choices=("auto", "yes", "no"),
        default="auto",
        help="include dy/dx (auto: when x has at most 64 elements)",
    )
    p.add_argument("--format", choices=("json", "csv", "npz"), help="default: from --output")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")


def run(args: argparse.Namespace) -> int:
    """Write x, dy, y, mean, var, dx (and more) with the options that made them."""
    from .._io import vectors_format, write_vectors

    fmt = vectors_format(args.output, args.format)
    x = input_x(args, args.dtype)
    axes = parse_axes(args.axes)
    arrays = _arrays(args, x, axes)
    options = options_record(args, x, axes) | {
        "affine": args.affine,
        "dy": (
            f"standard normal, seed {args.seed + 1}"
            if (args.dy or "random") == "random"
            else args.dy
        ),
        "x_source": args.input or f"standard normal, seed {args.seed}",
        "mean_var": "keepdims shape, float64, var divides by n - ddof",
        "jacobian_layout": "shape y.shape + x.shape" if "jacobian" in arrays else None,
        "normgrad": _version(),
    }
    text = write_vectors(arrays, options, fmt, args.output)
    if text is not None:
        sys.stdout.write(text)
        return 0
    summary = {
        "output": args.output,
        "format": fmt,
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "options": options,
    }
    if args.json:
        print_json(summary)
    else:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in arrays.items())
        Printer().line(f"wrote {fmt} vectors to {args.output}: {shapes}")
    return 0


def _arrays(args: argparse.Namespace, x: np.ndarray, axes: Any) -> dict[str, np.ndarray]:
    """x, dy, (weight, bias,) y, mean, var, dx, (dweight, dbias,) (jacobian), in file order."""
    from .._ops import normalize_backward, normalize_forward, normalize_jacobian

    kw = op_kwargs(args)
    dy = input_dy(args, x, "random")
    w = b = None
    if args.affine:
        w, b = affine_params(x, axes, args.seed)
    y, ctx = normalize_forward(x, axes, weight=w, bias=b, **kw)
    grads = normalize_backward(ctx, dy)
    arrays: dict[str, np.ndarray] = {"x": x, "dy": dy}
    if w is not None and b is not None:
        arrays |= {"weight": w, "bias": b}
    arrays |= {
        "y": np.asarray(y),
        "mean": np.asarray(ctx.mean),
        "var": np.asarray(ctx.var),
        "dx": np.asarray(grads.x),
    }
    if grads.weight is not None and grads.bias is not None:
        arrays |= {"dweight": np.asarray(grads.weight), "dbias": np.asarray(grads.bias)}
    if args.jacobian == "yes" or (args.jacobian == "auto" and x.size <= JACOBIAN_AUTO_MAX):
        arrays["jacobian"] = np.asarray(normalize_jacobian(x, axes, weight=w, bias=b, **kw))
    return arrays


def _version() -> str:
    from .. import __version__

    return __version__
