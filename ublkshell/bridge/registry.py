"""Where each device's daemon writes what it serves, so that `list`, `del`
and later a restarted server can find it: one JSON file per device under the
state directory (root-only, 0700/0600)."""
import json
import os

STATE_DIR = os.environ.get("UBLKSHELL_STATE_DIR", "/run/ublkshell")


def _devdir() -> str:
    return os.path.join(STATE_DIR, "devices")


def logdir() -> str:
    d = os.path.join(STATE_DIR, "log")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def write(dev_id: int, entry: dict) -> None:
    d = _devdir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, f"{dev_id}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read(dev_id: int):
    try:
        with open(os.path.join(_devdir(), f"{dev_id}.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def remove(dev_id: int) -> None:
    try:
        os.unlink(os.path.join(_devdir(), f"{dev_id}.json"))
    except FileNotFoundError:
        pass


def all_entries() -> dict:
    out = {}
    try:
        names = os.listdir(_devdir())
    except FileNotFoundError:
        return out
    for n in names:
        if n.endswith(".json") and n[:-5].isdigit():
            e = read(int(n[:-5]))
            if e is not None:
                out[int(n[:-5])] = e
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
