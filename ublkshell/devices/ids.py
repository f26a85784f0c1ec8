"""Device ids across transports.

ublk devices have the kernel's ids: 0, 1, ... always below UBLK_MAX_UBLKS
(1 << 20, the driver's minor limit). FUSE-transport devices (`add --transport
fuse`) have their own numbers, fuse0, fuse1, ..., stored as FUSE_BASE + N
so that everything keyed by an integer id (the registry, the statistics files,
the stats tree's inodes, the server's protocol) keeps one space without
collisions. People see and type the names: `stats fuse0`, `del fuse0`; the
raw number works too. In paths the names appear as they are typed: the
registry's `devices/fuse0.json`, the statistics in `fuse0.stats`, the stats
tree's `fuse0/` next to `ublkb0/`.
"""

FUSE_BASE = 1 << 20
FUSE_PREFIX = "fuse"


def is_fuse(dev_id: int) -> bool:
    return dev_id >= FUSE_BASE


def fuse_id(n: int) -> int:
    return FUSE_BASE + n


def name(dev_id) -> str:
    """What people type and read: `3` for ublk device 3, `fuse0` for FUSE device 0. A name
    is its own name: results carry names now, and code that names them again must not break."""
    if isinstance(dev_id, str):
        return name(parse(dev_id))
    return f"{FUSE_PREFIX}{dev_id - FUSE_BASE}" if is_fuse(dev_id) else str(dev_id)


def stem(dev_id: int) -> str:
    """The device's name in file and directory names: `ublkb3` (its block device), `fuse0`."""
    return name(dev_id) if is_fuse(dev_id) else f"ublkb{dev_id}"


def _canonical_number(text: str):
    # no signs, spaces or leading zeros: one spelling per id, so paths cannot alias
    return int(text) if text.isdigit() and text.isascii() and str(int(text)) == text else None


def from_name(text: str):
    """`name()` back to an id (`3`, `fuse0`), None for anything else."""
    if text.startswith(FUSE_PREFIX):
        n = _canonical_number(text[len(FUSE_PREFIX):])
        return None if n is None or n >= FUSE_BASE else fuse_id(n)
    n = _canonical_number(text)
    return n if n is not None and n < 2 * FUSE_BASE else None


def from_stem(text: str):
    """`stem()` back to an id (`ublkb3`, `fuse0`), None for anything else."""
    if text.startswith("ublkb"):
        n = _canonical_number(text[5:])
        return n if n is not None and n < FUSE_BASE else None
    return from_name(text) if text.startswith(FUSE_PREFIX) else None


def parse(text) -> int:
    """A device id as a user gives it: `3`, `fuse0` (or its raw number); ValueError if not."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    dev_id = None
    if t.startswith(FUSE_PREFIX):
        rest = t[len(FUSE_PREFIX):]
        if rest.isdigit() and rest.isascii() and int(rest) < FUSE_BASE:
            dev_id = fuse_id(int(rest))
    elif t.isdigit() and t.isascii() and int(t) < 2 * FUSE_BASE:
        dev_id = int(t)
    if dev_id is None:
        raise ValueError(f"{text!r} is not a device id (a number like 0, or fuseN for a FUSE device)")
    return dev_id


def arg(text: str) -> int:
    """parse() as an argparse type: `argument id: 'x' is not a device id ...`."""
    try:
        return parse(text)
    except ValueError as e:
        import argparse

        raise argparse.ArgumentTypeError(str(e)) from None
