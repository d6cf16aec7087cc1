"""Errors the command line turns into one clear line on stderr and exit status 2."""


class UsageError(ValueError):
    """A bad argument or input file, reported to the user without a traceback."""
