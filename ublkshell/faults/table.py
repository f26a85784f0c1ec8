"""A device's fault rules, in its shared-memory file (native/faults.h).

Every change takes an flock on the file, so the CLI, the server, the FUSE tree
and the daemon can all change rules; the native side publishes each change
whole, and the queue threads pick it up on their next IO.
"""
import errno
import fcntl
import os
from contextlib import contextmanager

from ..devices import ids as devids
from .._native import ffi, lib
from ..devices.paths import stats_path
from ..observe.shm import Shm
from ..errors import UblkError
from . import grammar


@contextmanager
def locked(dev_id: int):
    path = stats_path(dev_id)
    try:
        # Shm opens and checks the file (no symlink, no device node, the exact layout) before
        # anything else touches it; the lock goes on the very inode that is mapped
        s = Shm(path, writable=True, keep_fd=True)
    except FileNotFoundError:
        raise UblkError(f"device {devids.name(dev_id)} is not served by ublkshell (no {path})") from None
    try:
        fcntl.flock(s.fd, fcntl.LOCK_EX)
        if s.fault_area() == ffi.NULL:
            raise UblkError(f"device {devids.name(dev_id)}: its daemon keeps fault rules in another layout "
                            "(an older ublkshell); re-add it")
        yield s
    finally:
        s.close()


def add(dev_id: int, line: str) -> list[dict]:
    """Parse one rule line and install what it makes, all or nothing; returns them with their ids."""
    rules = grammar.parse(line)
    n = len(rules)
    structs = ffi.new("struct us_fault_rule[]", n)
    for i, rule in enumerate(rules):
        grammar.to_struct(rule, structs[i])
    ids = ffi.new("uint32_t[]", n)
    with locked(dev_id) as s:
        rc = lib.us_fault_add_set(s.base, structs, n, ids)
        if rc == -errno.ENOSPC:
            left = lib.US_FAULT_SLOTS - lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)
            raise UblkError(f"device {devids.name(dev_id)}: {n} rule(s) do not fit, "
                            f"{left} of {lib.US_FAULT_SLOTS} slots free (`clear` some)")
        if rc == -errno.ERANGE:
            raise UblkError(f"device {devids.name(dev_id)}: its {lib.US_FAULT_MAX_ID} rule ids are used up "
                            "(ids are never reused): re-add the device")
        if rc < 0:
            raise UblkError(f"device {devids.name(dev_id)}: the rule was refused: {os.strerror(-rc)}")
    return [dict(rule, id=int(ids[i]), text=grammar.describe(rule)) for i, rule in enumerate(rules)]


def rules(dev_id: int) -> dict:
    """{"seed": N, "hung": N, "heal_log": {"used": N, "size": N}, "rules": [{id, text, hits,
    left, healed, heal_lost, ...}]} in match order. A badblocks rule's `heal_lost` counts
    rewrites the full heal log could not remember (their sectors still fail reads)."""
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
            entry["healed"] = int(cs[i].healed)
            entry["heal_lost"] = int(cs[i].heal_lost)
        out.append(entry)
    size = lib.US_HEAL_ENTRIES
    return {"seed": int(area.seed), "hung": int(area.hung),
            "heal_log": {"used": min(int(area.heal_used), size), "size": size}, "rules": out}


def read_shm(s: Shm) -> dict:
    """The rules of an already mapped statistics file (the server's and the tree's view)."""
    if lib.us_fault_area_of(s.base) == ffi.NULL:
        return {"seed": 0, "hung": 0, "heal_log": {"used": 0, "size": 0}, "rules": []}
    return _read(s)


def clear(dev_id: int, rule_id: int = 0) -> int:
    """Remove one rule (or all with 0): how many were removed."""
    with locked(dev_id) as s:
        before = lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)
        rc = lib.us_fault_del(s.base, rule_id)
        if rc == -2:  # ENOENT
            raise UblkError(f"device {devids.name(dev_id)} has no fault rule #{rule_id} (see `faults {devids.name(dev_id)}`)")
        return before - lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)


def set_seed(dev_id: int, seed: int) -> None:
    if not 0 <= seed < 1 << 64:
        raise UblkError("seed must be a whole number in 0..2^64-1")
    with locked(dev_id) as s:
        lib.us_fault_set_seed(s.base, seed)
