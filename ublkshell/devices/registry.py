"""Where each device's daemon writes what it serves, so that `list`, `del`
and later a restarted server can find it: one JSON file per device in the
state directory's devices/ (root-only: ublkshell/files.py)."""
import json
import os

from . import ids as devids
from .. import files
from ..errors import UblkError

MAX_ENTRY = 1 << 20  # an entry is a few KB; anything bigger is not one of ours


def _path(d: str, dev_id: int) -> str:
    # devices/3.json for ublk device 3, devices/fuse0.json for FUSE device fuse0
    return os.path.join(d, f"{devids.name(dev_id)}.json")


def write(dev_id: int, entry: dict) -> None:
    data = json.dumps(entry, indent=1, sort_keys=True).encode()
    files.write_atomic(_path(files.sub_dir("devices"), dev_id), data)


def _valid(dev_id: int, e) -> bool:
    # entries are our own files in a root-only directory, but a half-written or
    # hand-edited one must not crash the readers that trust its types
    return (isinstance(e, dict) and e.get("id") == dev_id and isinstance(e.get("pid"), int)
            and not isinstance(e.get("pid"), bool) and isinstance(e.get("spec", {}), dict))


def read(dev_id: int):
    d = files.sub_dir("devices", create=False)
    if d is None:
        return None
    try:
        fd = files.open_nofollow(_path(d, dev_id), os.O_RDONLY)
    except (OSError, UblkError):
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            e = json.loads(f.read(MAX_ENTRY + 1)[:MAX_ENTRY])
    except (OSError, ValueError, RecursionError):
        return None
    return e if _valid(dev_id, e) else None


def remove(dev_id: int) -> None:
    d = files.sub_dir("devices", create=False)
    if d is not None:
        files.unlink_quiet(_path(d, dev_id))


def all_entries() -> dict:
    out = {}
    d = files.sub_dir("devices", create=False)
    if d is None:
        return out
    for n in os.listdir(d):
        dev_id = devids.from_name(n[:-5]) if n.endswith(".json") else None
        if dev_id is not None:
            e = read(dev_id)
            if e is not None:
                out[dev_id] = e
    return out
