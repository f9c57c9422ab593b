"""The error every bad input becomes: one line naming the flag, file, line or field, exit code 2."""


class UsageError(Exception):
    """A bad flag, file or value. The CLI prints it as one line and exits with code 2."""


def not_utf8(e: UnicodeDecodeError) -> str:
    """The one phrase every reader of a text file uses for bytes that are not UTF-8."""
    return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"


def brief(value) -> str:
    """A value as a message shows it: its repr, cut short (a message is one line, whatever the
    value a file or flag held)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 2, 60, 60, 40
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 4
    text = short.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
