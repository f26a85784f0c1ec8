"""Sizes as people write them: 512, 4k, 64M, 1G, 1.5G, 100GiB."""
from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, option: str) -> int:
    s = str(text).strip().lower()
    for suffix in ("ib", "b"):
        if len(s) > len(suffix) and s.endswith(suffix) and s[-len(suffix) - 1].isalpha():
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:].isalpha() else ""
    number = s[: len(s) - len(unit)]
    if unit not in _UNITS or not number:
        raise UsageError(f"{option}: {text!r} is not a size (try 512, 4k, 64M, 1G)")
    try:
        value = float(number) if "." in number else int(number, 10)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a size (try 512, 4k, 64M, 1G)") from None
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise UsageError(f"{option}: the size must be greater than zero")
    return nbytes


def human(nbytes: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= mult:
            return f"{nbytes / mult:.4g}{unit}"
    return f"{nbytes}B"
