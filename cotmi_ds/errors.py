"""The error every bad input becomes: one line naming the flag, file, line or field, exit code 2."""


class UsageError(Exception):
    """A bad flag, file or value. The CLI prints it as one line and exits with code 2."""
