r"""The op's scalar formulas, written once for every path.

Plain Python: the generic Array-API path calls them on arrays (with its namespace as `xp`),
and the fused kernels compile the same functions (`kernels/_loops.py` registers them with
numba), so every path computes the same expression in the same order. Notation as in
docs/derivation.md: within a group of `n` elements, `m = n - ddof`, `d = x - mu`.

    rstd  = 1 / sqrt(var + eps)                    (eps inside)
          = 1 / (sqrt(var) + eps)                  (eps outside)
    dx    = r (g - mean_g) + beta d,   mean_g = sum(g) / n,   beta = -c r^2 sum(g d) / m

(`c` is the variance path's coefficient: `rstd` inside, `1/sqrt(var)` outside.) The same
`dx` formula is the symmetric Jacobian applied to any vector, so it also gives the JVP.
With a mask `M` (the elements that count, `n = sum(M)`), the sums of the JVP run over the
counted elements, and the VJP gives the statistics' part to them only (`masked_gradient`).

RMS normalization (`center=False`): mu = 0, so d = x and var = sum(x^2) / n (m = n), and
the mean path drops out: mean_g = 0. The variance path is unchanged in both eps modes: with
s = sqrt(var), ds/dx_j = x_j / (n s), and d rstd / ds is -r^2 (outside: r = 1/(s + eps)) or
-r^3 s (inside: r = 1/sqrt(s^2 + eps)), so d rstd / dx_j = -c r^2 x_j / n with c = 1/s or
r; hence `dx = r g - (c / n) xhat sum(g xhat)`, xhat = r x: the same `beta`, mean_g = 0.
"""

from __future__ import annotations

from typing import Any


def rstd(xp: Any, var: Any, eps: float, inside: bool) -> Any:
    """`1 / sqrt(var + eps)` (eps inside) or `1 / (sqrt(var) + eps)` (eps outside)."""
    if inside:
        return 1.0 / xp.sqrt(var + eps)
    return 1.0 / (xp.sqrt(var) + eps)


def xhat(x: Any, mu: Any, r: Any) -> Any:
    """The normalized value `(x - mu) r`."""
    return (x - mu) * r


def gradient(g: Any, d: Any, r: Any, mean_g: Any, beta: Any) -> Any:
    """`dx = r (g - mean_g) + beta d`, with `d = x - mu` (see `backward_coefficients`)."""
    return r * (g - mean_g) + beta * d


def masked_gradient(xp: Any, g: Any, d: Any, r: Any, mean_g: Any, beta: Any, mask: Any) -> Any:
    """The VJP with a mask: `dx = r g + M (beta d - r mean_g)`: only the counted elements
    (`M`) move the statistics, so only they receive the statistics' part of the gradient."""
    stat = beta * d - r * mean_g
    return r * g + xp.where(mask, stat, xp.zeros_like(stat))


def backward_coefficients(
    sum_g: Any, sum_gd: Any, n: float, m: float, r: Any, c: Any, center: bool
) -> tuple[Any, Any]:
    """`(mean_g, beta)` of `dx = r (g - mean_g) + beta (x - mu)` from a group's `sum(g)` and
    `sum(g (x - mu))`; without `center` (RMS, mu = 0) there is no mean path: `mean_g = 0`
    (a scalar, whatever `sum_g` is)."""
    beta = -c * r * r * sum_gd / m
    if center:
        return sum_g / n, beta
    return 0.0, beta


def shifted_moments(n: float, s: float, q: float) -> tuple[float, float]:
    r"""`(mean, M2)` of `n` values `d` from `s = sum d` and `q = sum d^2`, each `d` a value
    minus one of the values (the shift): $M_2 = q - s^2/n$. As the shift is one of the
    values, $q = M_2 + n(\text{shift} - \bar x)^2 \le (n + 1) M_2$: the subtraction
    cancels at most a factor n + 1 of the sums' rounding, a relative error under
    $n^2 \epsilon$ (5e-10 for 2048 values summed in float64, far below float32's ulp).
    A constant block gives exactly 0."""
    mean = s / n
    return mean, max(q - s * mean, 0.0)  # (rounding may go below 0; max keeps a NaN first)


def chan_merge(
    cnt: float, mean: float, m2: float, nb: float, mb: float, qb: float
) -> tuple[float, float, float]:
    """Merge the moments `(count, mean, M2)` of a second part into a first (Chan et al.):
    exact at any offset between the parts. An empty part changes nothing; an empty first
    part is replaced without arithmetic (no `inf * 0` when the means overflow)."""
    if nb == 0.0:
        return cnt, mean, m2
    if cnt == 0.0:
        return nb, mb, qb
    tot, f, g = chan_weights(cnt, nb)
    merged_mean, merged_m2 = chan_step(mean, m2, mb, qb, f, g)
    return tot, merged_mean, merged_m2


def chan_weights(cnt: float, nb: float) -> tuple[float, float, float]:
    """`chan_merge`'s total count and its two ratios, `nb / tot` and `cnt nb / tot`: the
    same for every group of parts of equal counts (the column kernels compute them once)."""
    tot = cnt + nb
    return tot, nb / tot, cnt * nb / tot


def chan_step(mean: Any, m2: Any, mb: Any, qb: Any, f: float, g: float) -> tuple[Any, Any]:
    r"""`chan_merge`'s mean and M2 from the ratios `(f, g)` of `chan_weights`:
    $\bar x + \delta f$, $M_2 + M_{2,b} + \delta^2 g$ with $\delta = \bar x_b - \bar x$."""
    delta = mb - mean
    return mean + delta * f, m2 + qb + delta * delta * g


def chan_merge_arrays(xp: Any, a: tuple[Any, Any, Any], b: tuple[Any, Any, Any]) -> tuple[Any, ...]:
    """`chan_merge` elementwise on arrays of `(count, mean, M2)`: the same formula, with the
    empty parts' cases as `where` (an empty part's mean and M2 never enter the result)."""
    cnt, mean, m2 = a
    nb, mb, qb = b
    tot = cnt + nb
    safe = xp.where(tot > 0, tot, xp.ones_like(tot))
    delta = xp.where((cnt > 0) & (nb > 0), mb - mean, xp.zeros_like(mean))
    merged_mean = xp.where(cnt > 0, mean + delta * (nb / safe), mb)
    merged_m2 = xp.where(cnt > 0, m2, xp.zeros_like(m2)) + xp.where(nb > 0, qb, xp.zeros_like(qb))
    merged_mean = xp.where(nb > 0, merged_mean, mean)
    return tot, merged_mean, merged_m2 + delta * delta * (cnt * nb / safe)
