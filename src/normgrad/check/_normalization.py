"""What the checker knows about normalizations, y = (x - μ)/σ over groups of elements: a
missing term is named by the path it belongs to, the mean path (every x_j moves the group mean:
an error constant over the group) or the variance path (every x_j moves the group variance: an
error along x - mean, i.e. along x̂). The generic rules (`_rules.py`) consult it."""

from __future__ import annotations

from ._report import Template

MEAN_PATH = "the mean path (every x_j moves the group mean: a term constant over the group)"
VARIANCE_PATH = (
    "the variance path (every x_j moves the group variance: a term along x - mean, i.e. along x̂)"
)

# `paths` is MEAN_PATH, VARIANCE_PATH, or both joined by " and ".
CROSS_TERM_PATHS = Template(
    "missing_term",
    "the missing cross terms are {paths}.",
    "for a normalization y = (x - μ)/σ: dx = (1/σ)(g - mean(g) - x̂·mean(g·x̂)) with g = dy; the "
    "mean(g) term is the mean path, the x̂·mean(g·x̂) term the variance path.",
)
GROUP_PATHS = Template(
    "missing_term",
    "a term that couples all elements of a group is missing or wrong: {paths} ({groups} group(s) "
    "affected).",
    "check the chain rule through the shared statistics: the mean path gives -mean(g)/σ, the "
    "variance path -x̂·mean(g·x̂)/σ (g = dy·weight).",
)
TEMPLATES = (CROSS_TERM_PATHS, GROUP_PATHS)
