"""Normalizing the `axes` argument: one place for the rules.

Every error here is an `AxisError`: a `NormgradError` that is also `numpy.exceptions.AxisError`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from ._errors import AxisError

Axes = int | Sequence[int] | None


def normalize_axes(axes: Axes, ndim: int) -> tuple[int, ...]:
    """Return `axes` as a sorted tuple of non-negative ints for an array of rank `ndim`.

    `None` means every axis. Negative axes count from the end, as in NumPy.
    """
    if axes is None:
        return tuple(range(ndim))
    items = (axes,) if _is_int(axes) else axes
    try:
        items = tuple(items)  # type: ignore[arg-type]
    except TypeError:
        raise AxisError(
            f"axes must be None, an int or a tuple of ints; got {axes!r} "
            f"of type {type(axes).__name__}."
        ) from None
    if len(items) == 0:
        raise AxisError(
            "axes=() selects no axis, so every group would hold a single element; "
            "pass axes=None to normalize over all axes."
        )
    result = []
    for a in items:
        if not _is_int(a):
            raise AxisError(
                f"axes must contain ints; got {a!r} of type {type(a).__name__} in axes={axes!r}."
            )
        i = operator.index(a)
        if not -ndim <= i < ndim:
            raise AxisError(
                f"axis {i} is out of range for an array of rank {ndim}; "
                f"valid axes are {-ndim}..{ndim - 1}."
            )
        result.append(i % ndim)
    if len(set(result)) != len(result):
        raise AxisError(
            f"axes={axes!r} names the same axis twice (as non-negative axes: {result}); "
            "list each axis once."
        )
    return tuple(sorted(result))


def _is_int(a: object) -> bool:
    if isinstance(a, bool):
        return False
    try:
        operator.index(a)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def merge_axis(axes: Axes, axis: Axes) -> Axes:
    """`axis=` (as NumPy and the Array API spell it) for `axes=`; giving both is an error."""
    if axes is not None:
        raise AxisError(
            f"axes={axes!r} and axis={axis!r} were both given; they are the same argument "
            "(axis is NumPy's spelling): pass one of them."
        )
    return axis
