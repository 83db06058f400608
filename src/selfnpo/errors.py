"""User-facing errors: one line, naming the problem; the CLI prints them without a traceback."""


class SelfNPOError(Exception):
    """An error caused by user input or environment, reported as one line with exit code 2."""
