"""Exceptions."""


class FormatError(ValueError):
    """Bytes that are not a valid ibp encoding: truncated, corrupted or lying."""
