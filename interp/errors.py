"""One exception type for every user-facing error: the message says what was wrong and what to do."""


class InterpError(ValueError):
    """Bad input to interp (unknown model, bad site name, spec for another model, ...)."""
