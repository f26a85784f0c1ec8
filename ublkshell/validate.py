"""The one place where a verb's arguments are checked, whichever face they came
from: the command line, the shell (through the server), the socket, the stats
tree's `faults` file, the Python API.

Each verb declares its arguments as {name: Arg}; `check(verb, schema, args)`
returns a clean dict (types converted, numbers range-checked against what
they will fill, lists and strings bounded) or raises a one-line UsageError
naming the option. Nothing downstream sees an unchecked value, and nothing is
allocated from a number before its bound is checked. What a value *means*
(a size that must be a multiple of the block size, a rule's grammar) stays
with its owner, which only ever sees values of the right type and range."""
import math
from dataclasses import dataclass
from typing import Any, Callable

from .devices import ids as devids
from .errors import UsageError
from .units import MAX_DURATION_NS, parse_duration

MAX_TEXT = 4096
MAX_WORDS = 256
MAX_IDS = 1024
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64 = (1 << 63) - 1


@dataclass(frozen=True)
class Arg:
    label: str  # how people know it: `-d/--depth`, `ID`
    conv: Callable[[Any, str], Any]
    default: Any = None  # what an absent (or null) argument becomes
    required: bool = False


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def whole(lo: int, hi: int):
    """An integer in [lo, hi]: a JSON number without a fraction, or decimal digits."""
    def conv(value, label):
        if isinstance(value, str):
            t = value.strip()
            digits = t[1:] if t[:1] == "-" else t
            # ASCII only (int() takes other scripts' digits)
            if not (digits.isascii() and digits.isdigit()):
                raise UsageError(f"{label}: {_show(value)} is not a whole number")
            if len(digits) > 20:  # more than any bound here, and int() of it would cost
                raise UsageError(f"{label}: {_show(value)} is out of range ({lo}..{hi})")
            value = int(t)
        elif isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        elif not _plain_int(value):
            raise UsageError(f"{label}: {_show(value)} is not a whole number")
        if not lo <= value <= hi:
            raise UsageError(f"{label}: {value} is out of range ({lo}..{hi})")
        return value
    return conv


def fraction(lo: float, hi: float):
    def conv(value, label):
        if isinstance(value, str):
            try:
                value = float(value.strip()) if len(value) <= 40 else math.nan
            except ValueError:
                raise UsageError(f"{label}: {_show(value)} is not a number") from None
        if not (_plain_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise UsageError(f"{label}: {_show(value)} is not a number")
        if not lo <= value <= hi:
            raise UsageError(f"{label}: {value:g} is outside {lo:g}..{hi:g}")
        return float(value)
    return conv


def duration(default_unit: str | None = None, lo: int = 0, hi: int = MAX_DURATION_NS):
    """A duration in ns, through the one duration parser (units.py): `500us`, `2s`, `1m`;
    a bare number only where default_unit says what it counts. "" is none (0)."""
    def conv(value, label):
        if _plain_int(value) or isinstance(value, float):
            value = repr(value)
        value = text(64)(value, label)
        return parse_duration(value, label, lo=lo, hi=hi, default_unit=default_unit) if value.strip() else 0
    return conv


def flag(value, label):
    if isinstance(value, bool):
        return value
    if _plain_int(value) and value in (0, 1):
        return bool(value)
    raise UsageError(f"{label}: {_show(value)} is not true or false")


def text(max_len: int = MAX_TEXT):
    """A string people typed: bounded, no NUL (which no path or word may hold)."""
    def conv(value, label):
        if _plain_int(value):
            value = str(value)
        if not isinstance(value, str):
            raise UsageError(f"{label}: {_show(value)} is not a string")
        if len(value) > max_len:
            raise UsageError(f"{label}: longer than {max_len} characters")
        if "\0" in value:
            raise UsageError(f"{label}: holds a NUL character")
        return value
    return conv


def text_or_flag(max_len: int = 64):
    """`--recovery` and friends: absent/false, true (the default mode), or a name."""
    def conv(value, label):
        if value is None or isinstance(value, bool):
            return value
        return text(max_len)(value, label)
    return conv


def words(max_n: int = MAX_WORDS, max_len: int = MAX_TEXT):
    """A list of words (a string is split on white space)."""
    def conv(value, label):
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list):
            raise UsageError(f"{label}: {_show(value)} is not a list of words")
        if len(value) > max_n:
            raise UsageError(f"{label}: more than {max_n} words")
        return [text(max_len)(w, label) for w in value]
    return conv


def dev_id(value, label):
    """A device id: a number (0, 1, ...) or a name (`3`, `fuse0`)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{label}: {_show(value)} is not a device id (a number like 0, or fuseN)")
    try:
        d = devids.parse(value if isinstance(value, int) else text(64)(value, label))
    except ValueError:
        raise UsageError(f"{label}: {_show(value)} is not a device id (a number like 0, or fuseN)") from None
    if not 0 <= d < 2 * devids.FUSE_BASE:
        raise UsageError(f"{label}: {d} is not a device id")
    return d


def dev_ids(value, label):
    if not isinstance(value, list):
        value = [value]
    if len(value) > MAX_IDS:
        raise UsageError(f"{label}: more than {MAX_IDS} devices")
    return [dev_id(v, label) for v in value]


# the arguments most verbs take
ID = {"id": Arg("ID", dev_id, required=True)}
JSON = {"json": Arg("--json", flag, False)}


def check(verb: str, schema: dict, args) -> dict:
    """args (from any face) -> a clean dict with every declared argument (defaults filled)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UsageError(f"{verb}: arguments must be an object")
    unknown = [k for k in args if k not in schema]
    if unknown:
        raise UsageError(f"{verb}: unknown argument {_show(str(unknown[0]))}"
                         + (f" (it takes {', '.join(sorted(schema))})" if schema else " (it takes none)"))
    out = {}
    for name, arg in schema.items():
        value = args.get(name)
        if value is None:
            if arg.required:
                raise UsageError(f"{verb}: {arg.label} is required")
            out[name] = arg.default
        else:
            out[name] = arg.conv(value, arg.label)
    return out
