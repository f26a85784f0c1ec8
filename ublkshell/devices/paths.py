"""Where a device's files live on the host, by the names we give them: its statistics
file and mem data (in the data dir, files.py), its daemon's logs. Nothing here reads a
path from a file: `forget` removes only these names."""
import os

from . import ids as devids
from . import registry
from .. import files


def stats_path(dev_id: int, create: bool = False) -> str:
    """The device's statistics file, in the data dir; readers never create that dir."""
    # no data dir yet: a path that cannot exist, so readers say "no statistics"
    d = files.data_dir(create) or "/proc/self/.ublkshell-no-data-dir"
    return os.path.join(d, f"{devids.stem(dev_id)}.stats")


def mem_path(dev_id: int, create: bool = True):
    """Where a mem device's data lives; None if there is no data dir."""
    d = files.data_dir(create)
    return None if d is None else os.path.join(d, f"{devids.stem(dev_id)}.mem")


def logdir() -> str:
    return files.sub_dir("log")


def forget(dev_id: int) -> None:
    """Drop what a deleted device left on the host: its mem data, statistics, registry entry."""
    mem = mem_path(dev_id, create=False)
    files.unlink_quiet(mem)
    # a zoned mem device's zone state (devices/targets.py)
    files.unlink_quiet(mem and mem + ".zones")
    files.unlink_quiet(stats_path(dev_id))
    registry.remove(dev_id)
