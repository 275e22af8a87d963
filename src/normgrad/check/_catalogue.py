"""Every finding the checker can report, each kind's message and hint written once.

A `Template`'s message has `str.format` fields, filled by `Template.finding(evidence, ...)`;
the rules (`_rules.py`) build every `Finding` that way. `KINDS` lists the kinds in the order of
the catalogue. Normalization-specific texts live with that knowledge, in `_normalization.py`,
and are listed here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import _normalization
from ._report import Finding, Template

PASSING = ("ok", "fd_noise", "kink")  # the kinds of a check that passes (kink: inconclusive)

OK = Template("ok", "the backward matches finite differences within tolerance.")
FD_NOISE = Template(
    "fd_noise",
    "the mismatch (up to {mismatch:.3g}) exceeds rtol/atol but lies within the finite-difference "
    "error estimate (up to {fd_error:.3g}): no evidence of a bug, but the numerical side cannot "
    "confirm the requested accuracy.",
    "evaluate f in float64, let the checker choose the step (step=None), or loosen rtol/atol.",
)

_KINK = (
    ": f has a kink there (like relu(0) or abs(0)), so no single derivative exists and any value "
    "between the one-sided ones is a valid subgradient."
)
_KINK_HINT = (
    "not a bug in itself: check away from kinks (perturb x), or decide which one-sided derivative "
    "your backward should return there."
)
NONDIFFERENTIABLE = Template(
    "nondifferentiable",
    "left and right finite differences disagree at {count} element(s), e.g. {examples}" + _KINK,
    _KINK_HINT,
)

KINK = Template(
    "kink",
    "f has a kink at {count} element(s) (left and right finite differences disagree), e.g. "
    "{examples}; there the backward's values lie between the one-sided derivatives, so each is a "
    "valid subgradient: it returned {seen}. The central difference there is their average, so "
    "this is not confirmed either way (INCONCLUSIVE).",
    "not a bug: check away from kinks (perturb x) to confirm the rest; decide which one-sided "
    "derivative your backward should return at a tie or at 0 (relu'(0), abs'(0), max ties).",
)
NONDIFFERENTIABLE_JOINT = Template(
    "nondifferentiable",
    "f has a kink at {count} element(s), e.g. {examples}, and each of the backward's values there "
    "lies between the one-sided derivatives, but together they are no subgradient: moving those "
    "elements together (each by its step), f is smooth with <dy, J v> = {num:.4g}, while the "
    "backward gives <dx, v> = {ana:.4g}.",
    "at a tie (max, sort, argmax) the gradient must be shared, not copied: give it to one of the "
    "tied elements, or split it so that the shares add up to one.",
)
KINK_PROBES = Template(
    "kink",
    "left and right finite differences disagree along {count} probe direction(s): f has a kink "
    "there, so no single derivative exists and the probes cannot confirm the backward "
    "(INCONCLUSIVE).",
    "check away from kinks (perturb x), or use mode='full' on a smaller input, where each value "
    "is compared with the one-sided derivatives.",
)
NONDIFFERENTIABLE_OUTSIDE = Template(
    "nondifferentiable",
    "left and right finite differences disagree at {count} element(s), e.g. {examples}, and "
    "there the backward's value is outside the range of the one-sided derivatives (e.g. "
    "{value:.4g} at {first}, not in [{lo:.4g}, {hi:.4g}]): no subgradient gives it.",
    "at a kink the derivative must be one of the one-sided ones or between them (relu'(0) in "
    "[0, 1]); look at how the backward treats ties and exact zeros.",
)

NONFINITE = Template(
    "nonfinite",
    "the backward returned NaN or Inf at {count} of {n} elements of dx for {label}, first at "
    "index {first} (value {value}), where f and its finite differences are finite.",
    "look for a division by zero, a log or sqrt of 0 or of a negative, or an overflow (exp of a "
    "large x) in the backward at that element; use the stable form (eps inside the sqrt, "
    "log-sum-exp, a where() that avoids 0/0).",
)

_NOT_ZERO = " (within rounding) but the true gradient is not zero (up to {top:.3g})."
_ZERO_HINT = (
    "check that the backward writes its result (not a fresh zeros array), that no term is "
    "multiplied by a zero, and that gradients are not detached."
)
ZERO = Template("zero", "the backward returns zeros" + _NOT_ZERO, _ZERO_HINT)
ZERO_FOR_INPUT = Template(
    "zero", "the backward returns zeros for input {name}" + _NOT_ZERO, _ZERO_HINT
)

_LINEAR = " (a vector-Jacobian product must be linear in dy)."
_DY_HINT = (
    "multiply by the incoming gradient dy (the chain rule's outer factor) instead of ones, and do "
    "not add terms that do not contain dy."
)
IGNORES_DY = Template(
    "ignores_dy",
    "the backward returns the same result whatever dy is: it ignores dy" + _LINEAR,
    _DY_HINT,
)
NOT_LINEAR_IN_DY = Template(
    "not_linear",
    "vjp(x, a*dy1 + b*dy2) is not a*vjp(x, dy1) + b*vjp(x, dy2) (off by up to {err:.3g}): the "
    "result is not linear in dy" + _LINEAR,
    _DY_HINT,
)

OFFSET = Template(
    "offset",
    "vjp(x, 0) is not 0: the backward adds a term that does not contain dy, at {count} of {n} "
    "elements of dx (e.g. {indices}, up to {top:.3g}); the rest is linear in dy.",
    "a vector-Jacobian product has no constant part: remove the term added to dx outside the "
    "product with dy (a bias, a regularizer's gradient, a leftover from a buffer).",
)
NONDETERMINISTIC = Template(
    "nondeterministic",
    "two calls of the backward with the same x and dy differ, by up to {spread:.3g} at {count} "
    "of {n} elements (e.g. {indices}).",
    "look for uninitialised memory (np.empty, a buffer reused across calls), state kept between "
    "calls, or a random number inside the backward.",
)
MUTATES = Template(
    "mutates_input",
    "the backward writes into its arguments: it changed {what} (at {count} elements); the check "
    "gave it fresh copies, but in real use this corrupts the caller's arrays.",
    "compute into new arrays (x - m, not x -= m; np.multiply(a, b) without out= on an argument).",
)
DTYPE = Template(
    "dtype",
    "the backward returns dx{where} as {got} for an input of dtype {want}.",
    "return the gradient in the input's dtype (dx.astype(x.dtype)); a coarser one loses "
    "precision, a finer one breaks frameworks that require matching dtypes.",
)

# `what` is "backward" (or "jvp", see JVP_SIGN and JVP_SCALE).
SIGN = Template(
    "sign",
    "the {what} has the wrong sign: analytic = -numerical everywhere.",
    "look for a flipped subtraction (a - b vs b - a) or a minus sign lost or added in the chain "
    "rule.",
)
SCALE = Template(
    "scale",
    "the {what} is off by a constant factor: analytic = {factor_name} × numerical.",
    "look for a factor of that size: a 2 from differentiating a square, a 1/N or N from a mean vs "
    "a sum, a step size or temperature applied twice or not at all.",
)

# One input of several (a tuple or pytree x), named by its position or path.
SIGN_FOR_INPUT = Template(
    "sign",
    "the gradient of input {input} has the wrong sign: analytic = -numerical there (the other "
    "inputs: {others}).",
    SIGN.hint,
)
SCALE_FOR_INPUT = Template(
    "scale",
    "the gradient of input {input} is off by a constant factor: analytic = {factor_name} × "
    "numerical there (the other inputs: {others}).",
    SCALE.hint,
)

LAYOUT = Template(
    "layout",
    "the gradient{where} has the right values in the wrong places: it is the true dx of shape "
    "{shape} {how}.",
    "return dx in x's own layout: no .T on the result, and reshape with the axes in x's order "
    "(move axes back with np.moveaxis/transpose before reshaping, not after).",
)

_UNTRANSPOSED = "the backward computes J·dy instead of Jᵀ·dy (the Jacobian is used untransposed"
_TRANSPOSE_HINT = (
    "a vector-Jacobian product sums over outputs: dx_j = Σ_i dy_i ∂y_i/∂x_j. Swap the roles of "
    "the indices (e.g. reverse a cumsum, transpose a matrix, flip a convolution kernel)."
)
TRANSPOSE = Template("transpose", _UNTRANSPOSED + ").", _TRANSPOSE_HINT)
TRANSPOSE_SCALED = Template("transpose", _UNTRANSPOSED + ", times {factor_name}).", _TRANSPOSE_HINT)

_DIAGONAL = (
    "the backward uses only ∂y_i/∂x_i (its Jacobian is diagonal): the cross terms ∂y_i/∂x_j "
    "(j ≠ i) through quantities shared by many elements (a mean, a variance, a sum) are missing; "
)
_DIAGONAL_HINT = (
    "every x_j also moves the shared quantities that every y_i depends on: add their paths to the "
    "chain rule (dx_j = Σ_i dy_i ∂y_i/∂x_j sums over ALL outputs i)."
)
DIAGONAL = Template("diagonal", _DIAGONAL + "its diagonal is right.", _DIAGONAL_HINT)
DIAGONAL_SHIFTED = Template(
    "diagonal",
    _DIAGONAL + "its diagonal also differs by a constant {shift:.4g} (a term {shift:.4g}·dy too "
    "many: the missing cross terms' own diagonal part).",
    _DIAGONAL_HINT,
)
DIAGONAL_WRONG = Template(
    "diagonal", _DIAGONAL + "its diagonal differs from the true one as well.", _DIAGONAL_HINT
)
DIAGONAL_PROBE = Template(
    "diagonal",
    _DIAGONAL + "seen in probe mode with a cotangent on a random half of the outputs (dx is zero "
    "on the other half, while J couples the halves); the diagonal itself is not compared.",
    _DIAGONAL_HINT,
)

LOW_RANK_ERROR = Template(
    "missing_term",
    "the error has rank {rank}: a term that couples many elements (through a shared quantity such "
    "as a sum, mean or norm) is missing or wrong.",
    "find the quantity that all outputs share and add (or fix) its path in the chain rule.",
)

PARTIAL = Template(
    "partial",
    "most elements are right but {count} of {n} are wrong: {indices}{more}.",
    "look at what is special about those elements: a boundary, padding, the first or last "
    "element, a tie, a masked or clipped position.",
)
PARTIAL_OUTPUTS = Template(
    "partial",
    "the backward mishandles the cotangent of {count} of {m} outputs (flat output indices "
    "{outputs}); the others are right.",
    "look at the special cases of those outputs: boundaries, padding, the first or last element, "
    "a masked position.",
)
PARTIAL_RANGES = Template(
    "partial",
    "the mismatch is confined to {count} index range(s) of x (first..last: {ranges}) plus "
    "elements {indices}; the localization budget ran out before single elements were isolated.",
    "check those elements with mode='full' on a slice, or look at what is special about them "
    "(boundaries, padding).",
)

UNKNOWN = Template(
    "unknown",
    "the backward is wrong at {bad} of {n} elements and no known pattern (zero, sign, scale, "
    "transpose, diagonal, missing term, partial) explains the difference.",
    "compare report.analytic_jacobian with report.numerical_jacobian (or report.plot) to see "
    "where they differ; re-derive the chain rule step by step.",
)
UNKNOWN_PROBES = Template(
    "unknown",
    "the backward is wrong along random directions, the mismatch is spread over many elements, "
    "and it is not a constant factor, a sign or a transpose.",
    "run check_gradients(..., mode='full') on a smaller input of the same function for a finer "
    "diagnosis (diagonal, missing term, partial).",
)

# The forward derivative: every message starts with "jvp: ", one hint for all.
_JVP_HINT = "the forward derivative must be ty = J·tx, the transpose of what vjp computes."
JVP_NONFINITE = Template(
    "nonfinite", "jvp: jvp returns NaN or Inf where J·tx is finite.", _JVP_HINT
)
JVP_ZERO = Template("zero", "jvp: jvp returns zeros but J·tx is not zero.", _JVP_HINT)
JVP_SIGN = Template("sign", "jvp: " + SIGN.message, _JVP_HINT)
JVP_SCALE = Template("scale", "jvp: " + SCALE.message, _JVP_HINT)
JVP_UNKNOWN = Template(
    "unknown",
    "jvp: jvp(x, tx) disagrees with the finite-difference J·tx in no simple pattern.",
    _JVP_HINT,
)

CATALOGUE: tuple[Template, ...] = (
    OK,
    FD_NOISE,
    NONDIFFERENTIABLE,
    NONDIFFERENTIABLE_OUTSIDE,
    NONDIFFERENTIABLE_JOINT,
    KINK,
    KINK_PROBES,
    NONFINITE,
    JVP_NONFINITE,
    ZERO,
    ZERO_FOR_INPUT,
    JVP_ZERO,
    NONDETERMINISTIC,
    MUTATES,
    DTYPE,
    IGNORES_DY,
    OFFSET,
    NOT_LINEAR_IN_DY,
    SIGN,
    JVP_SIGN,
    SCALE,
    JVP_SCALE,
    SIGN_FOR_INPUT,
    SCALE_FOR_INPUT,
    LAYOUT,
    TRANSPOSE,
    TRANSPOSE_SCALED,
    DIAGONAL,
    DIAGONAL_SHIFTED,
    DIAGONAL_WRONG,
    DIAGONAL_PROBE,
    *_normalization.TEMPLATES,
    LOW_RANK_ERROR,
    PARTIAL,
    PARTIAL_OUTPUTS,
    PARTIAL_RANGES,
    UNKNOWN,
    UNKNOWN_PROBES,
    JVP_UNKNOWN,
)
KINDS = tuple(dict.fromkeys(t.kind for t in CATALOGUE))


FOR_INPUT = "input {name}: "  # leads a finding made on one input's own part (`for_input`)


def for_input(finding: Finding, name: str, position: int) -> Finding:
    """`finding`, made on the view of one input of several, as said of that input: its name
    leads the message, and the evidence names it (`input`) and its position (`position`)."""
    evidence = {**finding.evidence, "input": name, "position": position}
    message = FOR_INPUT.format(name=name) + finding.message
    return Finding(finding.kind, message, finding.hint, evidence)


def template_of(finding: Finding) -> Template | None:
    """The catalogue's template that `finding` was built from (after `for_input`'s lead, if it
    has one), or None."""
    lead = FOR_INPUT.format(name=finding.evidence.get("input"))
    if "position" in finding.evidence and finding.message.startswith(lead):
        finding = Finding(finding.kind, finding.message[len(lead) :], finding.hint)
    return next((t for t in CATALOGUE if t.matches(finding)), None)


def nice_number(c: float, sizes: Sequence[int]) -> str:
    """A readable name for a fitted factor: 2, 1/2, -1, N=784, 1/N, 3/2..."""
    if not math.isfinite(c):
        return str(c)
    for n in sorted(set(int(s) for s in sizes if s > 2), reverse=True):
        for val, name in ((n, f"{n} (= n)"), (1 / n, f"1/{n} (= 1/n)")):
            for sgn, sname in ((1, ""), (-1, "-")):
                if abs(c - sgn * val) <= 1e-4 * abs(val):
                    return sname + name
    for q in range(1, 9):
        p = round(c * q)
        if p != 0 and abs(c - p / q) <= 1e-4 * abs(c):
            return str(p) if q == 1 else f"{p}/{q}"
    return f"{c:.6g}"
