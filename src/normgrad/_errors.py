"""The one exception type for user errors (and its axis flavour)."""

try:
    from numpy.exceptions import AxisError as _NumpyAxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError as _NumpyAxisError  # type: ignore[attr-defined,no-redef]


class NormgradError(ValueError):
    """Raised for bad input: the message says what was received and how to fix it.

    A subclass of `ValueError`, so `except ValueError` also catches it.
    """


class AxisError(NormgradError, _NumpyAxisError):
    """A bad `axes`/`axis` argument: a `NormgradError` that is also NumPy's `AxisError`, so
    code written for NumPy's axis checks catches it too."""

    def __init__(self, message: str) -> None:
        _NumpyAxisError.__init__(self, message)  # (NumPy's one-argument form: the message)
