"""Colour for what a reader must not miss: errors, and IOs that failed or met a fault.
Only on a terminal, and never when NO_COLOR is set (no-color.org) or TERM is dumb, so
that pipes, logs and tests see plain text."""
import os

CODES = {"red": "31", "yellow": "33", "bold": "1"}


def enabled(stream) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, colour: str, stream) -> str:
    return f"\x1b[{CODES[colour]}m{text}\x1b[0m" if enabled(stream) else text


def of_record(r: dict) -> str | None:
    """A trace record's colour: red if the IO failed, yellow if a fault rule touched it."""
    if r.get("result", 0) < 0:
        return "red"
    return "yellow" if r.get("fault") else None
