"""The one exception users see: its message is printed as a single line."""


class UblkError(Exception):
    """A failure worth one line to the user (never a traceback)."""


class UsageError(UblkError):
    """Bad input on the command line: the message names the option."""
