"""The error every bad input becomes: one line naming the flag, file, line or field, exit code 2."""


class UsageError(Exception):
    """A bad flag, file or value. The CLI prints it as one line and exits with code 2."""


def not_utf8(e: UnicodeDecodeError) -> str:
    """The one phrase every reader of a text file uses for bytes that are not UTF-8."""
    return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
