r"""Per-group statistics as values: `moments(x, axes)` and their exact merge.

A `Moments` holds, per group, the count $n$, the mean $\mu$ and the sum of squared
deviations $M_2 = \sum (x-\mu)^2$ (float64 where the library has it, keepdims shape).
Two parts merge by Chan et al.'s formula (`_formulas.chan_merge_arrays`):

$$ n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad \mu = \mu_a + \delta\,\frac{n_b}{n},\quad
   M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n} $$

which works at any offset between the parts (no $E[x^2] - E[x]^2$), so moments can be
built chunk by chunk in any order and any chunk size.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._axes import Axes, normalize_axes
from ._formulas import chan_merge_arrays
from ._generic import compute_dtype
from ._validate import check_moments_pair, namespace

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


def moments(x: Array, axes: Axes = None) -> Moments:
    """`Moments` of each group of `x` along `axes` (all axes when None), two-pass: the mean
    about each group's first element, then the squared deviations."""
    xp = namespace(x)
    ax = normalize_axes(axes, x.ndim)
    xc = xp.astype(x, compute_dtype(xp, x))
    shift = xc[tuple(slice(0, 1) if i in ax else slice(None) for i in range(x.ndim))]
    mean = shift + xp.mean(xc - shift, axis=ax, keepdims=True)
    d = xc - mean
    n = 1
    for i in ax:
        n *= int(x.shape[i])
    return Moments(xp.full_like(mean, float(n)), mean, xp.sum(d * d, axis=ax, keepdims=True))
