"""normgrad: mean-variance normalization over any axes with exact derivatives, and a
gradient checker that says what is wrong."""

from ._errors import NormgradError
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

__version__ = "0.1.0"

__all__ = [
    "BackwardTangents",
    "Gradients",
    "NormContext",
    "NormgradError",
    "normalize",
    "normalize_backward",
    "normalize_backward_jvp",
    "normalize_forward",
    "normalize_jacobian",
    "normalize_jvp",
]
