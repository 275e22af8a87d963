"""The one exception type for user errors."""


class NormgradError(ValueError):
    """Raised for bad input: the message says what was received and how to fix it.

    A subclass of `ValueError`, so `except ValueError` also catches it.
    """
