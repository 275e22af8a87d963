r"""Per-group statistics as values: `moments(x, axes)` and their exact merge.

A `Moments` holds, per group, the count $n$, the mean $\mu$ and the sum of squared
deviations $M_2 = \sum (x-\mu)^2$ (float64 where the library has it, keepdims shape).
Two parts merge by Chan et al.'s formula (`_formulas.chan_merge_arrays`):

$$ n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\,\frac{n_b}{n},\quad
   M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n} $$

which works at any offset between the parts (no $E[x^2] - E[x]^2$), so moments can be
built chunk by chunk in any order and any chunk size. On Dask arrays `moments` does just
that: each chunk's moments (a task per chunk), then a tree of merges along each reduced
axis (log2 of its chunk count levels), so no group is ever gathered in one piece.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat as aac
import numpy as np

from ._axes import Axes, normalize_axes
from ._formulas import chan_merge_arrays
from ._generic import compute_dtype, masked_moments
from ._validate import check_moments_pair, check_nan_policy, count_mask, namespace, refuse_nan

Array = Any


class Moments(NamedTuple):
    """Per-group `count`, `mean` and `m2` (sum of squared deviations), keepdims arrays."""

    count: Array
    mean: Array
    m2: Array

    def var(self, ddof: float = 0) -> Array:
        r"""$M_2 / (n - \mathrm{ddof})$; NaN for a group with no more than `ddof` elements."""
        xp = namespace(self.m2)
        dof = self.count - ddof
        safe = xp.where(dof > 0, dof, xp.ones_like(dof))
        return xp.where(dof > 0, self.m2 / safe, xp.full_like(self.m2, float("nan")))

    def merge(self, other: Moments) -> Moments:
        """The moments of both parts' elements together (Chan's formula), group by group."""
        check_moments_pair(self, other, "merge")
        return Moments(*chan_merge_arrays(namespace(self.m2), self, other))

    def concat(self, other: Moments, axis: int) -> Moments:
        """The moments of two arrays joined along a kept `axis` (more groups, not more
        elements per group)."""
        check_moments_pair(self, other, "concat", axis)
        xp = namespace(self.m2)
        return Moments(*(xp.concat([a, b], axis=axis) for a, b in zip(self, other, strict=True)))


def moments(
    x: Array, axes: Axes = None, *, mask: Array | None = None, nan_policy: str = "propagate"
) -> Moments:
    """`Moments` of each group of `x` along `axes` (all axes when None), two-pass: the mean
    about each group's first element, then the squared deviations.

    `mask` (boolean, broadcastable to x) and `nan_policy` as in `normalize`: with a mask
    (or "omit") only the counted elements enter, and a group without any has count 0 and
    NaN mean. Dask arrays reduce chunk by chunk with a tree of `merge`s.
    """
    xp = namespace(x)
    ax = normalize_axes(axes, x.ndim)
    if check_nan_policy(nan_policy) == "raise":
        refuse_nan(x)
    masked = mask is not None or nan_policy == "omit"
    counted = count_mask(xp, x, mask, nan_policy == "omit") if masked else None
    if aac.is_dask_array(x):
        return _dask_moments(x, ax, counted)
    return _moments(xp, x, ax, counted)


def _moments(xp: Any, x: Array, ax: tuple[int, ...], mask: Array | None) -> Moments:
    xc = xp.astype(x, compute_dtype(xp, x))
    if mask is not None:
        return Moments(*masked_moments(xp, xc, mask, ax))
    shift = xc[tuple(slice(0, 1) if i in ax else slice(None) for i in range(x.ndim))]
    mean = shift + xp.mean(xc - shift, axis=ax, keepdims=True)
    d = xc - mean
    n = 1
    for i in ax:
        n *= int(x.shape[i])
    return Moments(xp.full_like(mean, float(n)), mean, xp.sum(d * d, axis=ax, keepdims=True))


def _dask_moments(x: Array, ax: tuple[int, ...], mask: Array | None) -> Moments:
    """One task per chunk gives its `(count, mean, m2)`, side by side along the first reduced
    axis (3 per chunk); then `merge` pairs of neighbouring chunks' moments, level by level."""
    import dask.array as da

    first = ax[0]
    out_chunks = tuple(
        (3 if i == first else 1,) * len(c) if i in ax else c for i, c in enumerate(x.chunks)
    )
    args = [x] if mask is None else [x, da.asarray(mask).rechunk(x.chunks)]
    parts = da.map_blocks(
        _block_moments, *args, ax=ax, chunks=out_chunks, dtype=compute_dtype(namespace(x), x),
        meta=np.empty((0,) * x.ndim),
    )  # fmt: skip

    def pick(k: int) -> Array:
        return parts[tuple(slice(k, None, 3) if i == first else slice(None) for i in range(x.ndim))]

    m = Moments(pick(0), pick(1), pick(2))
    for axis in ax:
        m = _merge_tree(m, axis)
    return m


def _block_moments(xb: np.ndarray, mb: np.ndarray | None = None, *, ax: tuple[int, ...]) -> Any:
    xp = namespace(xb)
    m = _moments(xp, xb, ax, mb)
    return np.concatenate(tuple(m), axis=ax[0])


def _merge_tree(m: Moments, axis: int) -> Moments:
    """Merge the moments along `axis` pairwise, neighbours first, until one is left."""
    xp = namespace(m.m2)
    ndim = m.m2.ndim

    def sl(a: Array, start: int, stop: int, step: int = 1) -> Array:
        return a[tuple(slice(start, stop, step) if i == axis else slice(None) for i in range(ndim))]

    while m.m2.shape[axis] > 1:
        k = m.m2.shape[axis]
        h = k // 2
        merged = chan_merge_arrays(
            xp, tuple(sl(a, 0, 2 * h, 2) for a in m), tuple(sl(a, 1, 2 * h, 2) for a in m)
        )
        if k % 2:
            merged = tuple(
                xp.concat([a, sl(b, 2 * h, k)], axis=axis) for a, b in zip(merged, m, strict=True)
            )
        m = Moments(*merged)
    return m
