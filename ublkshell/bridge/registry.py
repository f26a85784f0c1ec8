"""Where each device's daemon writes what it serves, so that `list`, `del`
and later a restarted server can find it: one JSON file per device under the
state directory (root-only, 0700/0600)."""
import json
import os

from .. import devids

STATE_DIR = os.environ.get("UBLKSHELL_STATE_DIR", "/run/ublkshell")


def _devdir() -> str:
    return os.path.join(STATE_DIR, "devices")


def logdir() -> str:
    d = os.path.join(STATE_DIR, "log")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _path(dev_id: int) -> str:
    # devices/3.json for ublk device 3, devices/fuse0.json for FUSE device fuse0
    return os.path.join(_devdir(), f"{devids.name(dev_id)}.json")


def write(dev_id: int, entry: dict) -> None:
    d = _devdir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = _path(dev_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read(dev_id: int):
    try:
        with open(_path(dev_id)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def remove(dev_id: int) -> None:
    try:
        os.unlink(_path(dev_id))
    except FileNotFoundError:
        pass


def all_entries() -> dict:
    out = {}
    try:
        names = os.listdir(_devdir())
    except FileNotFoundError:
        return out
    for n in names:
        dev_id = devids.from_name(n[:-5]) if n.endswith(".json") else None
        if dev_id is not None:
            e = read(dev_id)
            if e is not None:
                out[dev_id] = e
    return out


def pid_alive(pid) -> bool:
    """True if pid runs and is not a zombie waiting to be reaped."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
