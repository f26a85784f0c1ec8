"""Sizes and durations as people write them: 512, 4k, 1.5G, 100GiB; 500us, 5ms, 2s, 1m.

One parser each, used by every face (options, rule words, trace filters, the
socket). Numbers are read exactly (no float rounding, no overflow to
infinity) and bounded before anything is computed from them, so `1.5e400k`
or forty digits of seconds are a one-line error naming the option."""
import re

from .errors import UsageError

SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
              "e": 1 << 60}
# the largest byte count anything takes: a signed 64-bit file offset
MAX_SIZE = (1 << 63) - 1
DURATION_UNITS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
# longer than any timer the tool arms (a day); up/down phases and durations stay below this
MAX_DURATION_NS = 24 * 3600 * 10**9
# digits a person types: more is a mistake (or an attack on int())
_NUMBER = r"([0-9]{1,24})(?:\.([0-9]{1,24}))?"  # ASCII digits only: \d takes any script's
_SIZE_RE = re.compile(_NUMBER + r"([kmgtpe]?)(?:i?b)?", re.IGNORECASE)
_DURATION_RE = re.compile(_NUMBER + r"(ns|us|ms|s|m|h)?")


def _exact(whole: str, frac: str | None):
    # imported here: every daemon imports this module, few parse a size
    from fractions import Fraction

    return Fraction(int(whole)) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)


def parse_size(text, option: str, *, lo: int = 1, hi: int = MAX_SIZE) -> int:
    """`1.5G` -> 1610612736; UsageError naming option for anything else or out of [lo, hi]."""
    s = str(text).strip()
    m = _SIZE_RE.fullmatch(s)
    if not m or (s[-1:].lower() == "b" and not m.group(3) and s[-2:-1].isalpha()):
        raise UsageError(f"{option}: {str(text)[:40]!r} is not a size (try 512, 4k, 64M, 1G)")
    value = _exact(m.group(1), m.group(2)) * SIZE_UNITS[m.group(3).lower()]
    if value.denominator != 1:
        raise UsageError(f"{option}: {text} is not a whole number of bytes")
    nbytes = int(value)
    if nbytes <= 0 and lo > 0:
        raise UsageError(f"{option}: the size must be greater than zero")
    if not lo <= nbytes <= hi:
        raise UsageError(f"{option}: {text} is out of range ({human(lo)}..{human(hi)})")
    return nbytes


def parse_duration(text, option: str, *, lo: int = 0, hi: int = MAX_DURATION_NS,
                   default_unit: str | None = None) -> int:
    """`1.5ms` -> 1500000 (ns). Without a unit only if default_unit says which."""
    s = str(text).strip()
    m = _DURATION_RE.fullmatch(s)
    unit = (m.group(3) if m else None) or default_unit
    if not m or unit is None:
        raise UsageError(f"{option}: {str(text)[:40]!r} is not a duration (e.g. 500us, 5ms, 2s, 1m)")
    value = _exact(m.group(1), m.group(2)) * DURATION_UNITS[unit]
    if value.denominator != 1:
        raise UsageError(f"{option}: {text} is not a whole number of nanoseconds")
    ns = int(value)
    if not lo <= ns <= hi:
        raise UsageError(f"{option}: {text} is out of range ({fmt_duration(lo)}..{fmt_duration(hi)})")
    return ns


def human(nbytes: int) -> str:
    for unit, mult in (("E", 1 << 60), ("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                       ("K", 1 << 10)):
        if nbytes >= mult:
            return f"{nbytes / mult:.4g}{unit}"
    return f"{nbytes}B"


def fmt_duration(ns: int) -> str:
    """A duration the parser reads back exactly: 5ms, 1500us, 2s."""
    for unit, scale in (("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns"
