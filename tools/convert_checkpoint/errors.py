"""The one error type users see: a single line, exit code 2, nothing written."""


class ConversionError(Exception):
    """Bad input, flags or layout. Raised before any output byte is written."""

    exit_code = 2
