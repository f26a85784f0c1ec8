"""A device's fault rules, in its shared-memory file (native/faults.h).

Every change takes an flock on the file, so the CLI, the server, the FUSE tree
and the daemon can all change rules; the native side publishes each change
whole, and the queue threads pick it up on their next IO.
"""
import fcntl
import os
from contextlib import contextmanager

from .._native import ffi, lib
from ..bridge.shm import Shm, path_for
from .. import devids
from ..errors import UblkError
from . import grammar


@contextmanager
def locked(dev_id: int):
    if devids.is_fuse(dev_id):
        # its handlers run no fault rules: accepting one would be a silent no-op
        raise UblkError(f"{devids.name(dev_id)}: fault injection is for ublk devices; "
                        "the FUSE transport has none")
    path = path_for(dev_id)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UblkError(f"device {dev_id} is not served by ublkshell (no {path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        s = Shm(path, writable=True).check()
        try:
            if s.fault_area() == ffi.NULL:
                raise UblkError(f"device {dev_id}: its daemon predates fault injection; re-add it")
            yield s
        finally:
            s.close()
    finally:
        os.close(fd)


def add(dev_id: int, line: str) -> list[dict]:
    """Parse one rule line and install what it makes; returns them with their ids."""
    rules = grammar.parse(line)
    out = []
    with locked(dev_id) as s:
        left = lib.US_FAULT_SLOTS - lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)
        # all or nothing: a badblocks list must not land half
        if len(rules) > left:
            raise UblkError(f"device {dev_id}: {len(rules)} rule(s) do not fit, "
                            f"{left} of {lib.US_FAULT_SLOTS} slots free (`clear` some)")
        for rule in rules:
            r = ffi.new("struct us_fault_rule *")
            grammar.to_struct(rule, r)
            rid = lib.us_fault_add(s.base, r)
            if rid < 0:
                raise UblkError(f"device {dev_id}: the rule was refused: {os.strerror(-rid)}")
            out.append(dict(rule, id=rid, text=grammar.describe(rule)))
    return out


def rules(dev_id: int) -> dict:
    """{"seed": N, "hung": N, "rules": [{id, text, hits, left, ...}]} in match order."""
    with locked(dev_id) as s:
        return _read(s)


def _read(s: Shm) -> dict:
    n = lib.US_FAULT_SLOTS
    rs = ffi.new("struct us_fault_rule[]", n)
    cs = ffi.new("struct us_fault_ctr[]", n)
    got = lib.us_fault_list(s.base, rs, cs, n)
    got = min(got, n) if got >= 0 else got
    if got < 0:
        raise UblkError(f"{s.path}: cannot read the fault rules: {os.strerror(-got)}")
    area = lib.us_fault_area_of(s.base)
    out = []
    for i in range(got):
        rule = grammar.from_struct(rs[i])
        entry = dict(rule, id=int(rs[i].id), text=grammar.describe(rule), hits=int(cs[i].hits))
        if rule["count"] >= 0:
            entry["left"] = int(cs[i].left)
        if rule["action"] == "badblocks":
            lo, hi = rule["lba"]
            span = hi - lo + 1
            healed = int(cs[i].healed) & ((1 << span) - 1)
            entry["healed"] = bin(healed).count("1")
        out.append(entry)
    return {"seed": int(area.seed), "hung": int(area.hung), "rules": out}


def read_shm(s: Shm) -> dict:
    """The rules of an already mapped statistics file (the server's and the tree's view)."""
    if lib.us_fault_area_of(s.base) == ffi.NULL:
        return {"seed": 0, "hung": 0, "rules": []}
    return _read(s)


def clear(dev_id: int, rule_id: int = 0) -> int:
    """Remove one rule (or all with 0): how many were removed."""
    with locked(dev_id) as s:
        before = lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)
        rc = lib.us_fault_del(s.base, rule_id)
        if rc == -2:  # ENOENT
            raise UblkError(f"device {dev_id} has no fault rule #{rule_id} (see `faults {dev_id}`)")
        return before - lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)


def set_seed(dev_id: int, seed: int) -> None:
    if not 0 <= seed < 1 << 64:
        raise UblkError("seed must be a whole number in 0..2^64-1")
    with locked(dev_id) as s:
        lib.us_fault_set_seed(s.base, seed)
