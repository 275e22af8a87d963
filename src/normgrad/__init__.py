"""normgrad: mean-variance normalization over any axes with exact derivatives, and a
gradient checker that says what is wrong."""

from ._dispatch import Plan, plan_backward, plan_forward, use_kernels
from ._errors import NormgradError
from ._explain import explain
from ._moments import Moments, moments
from ._ops import (
    BackwardTangents,
    Gradients,
    NormContext,
    normalize,
    normalize_backward,
    normalize_backward_jvp,
    normalize_forward,
    normalize_jacobian,
    normalize_jvp,
)
from ._runtime import release_buffers
from .check import Finding, GradReport, assert_gradients, check_gradients, check_hvp
from .check._external import External, external

__version__ = "0.1.0"

__all__ = [
    "BackwardTangents",
    "External",
    "Finding",
    "GradReport",
    "Gradients",
    "Moments",
    "NormContext",
    "NormgradError",
    "Plan",
    "assert_gradients",
    "check_gradients",
    "check_hvp",
    "explain",
    "external",
    "moments",
    "normalize",
    "normalize_backward",
    "normalize_backward_jvp",
    "normalize_forward",
    "normalize_jacobian",
    "normalize_jvp",
    "plan_backward",
    "plan_forward",
    "release_buffers",
    "use_kernels",
]
