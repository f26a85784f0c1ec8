"""What the stats tree and the stream requests read: the registry's devices and each
device's shared memory, kept open while the file stays the same."""
import os

from ..devices import paths, registry
from ..errors import UblkError
from ..observe import shm as shm_mod


class DeviceSource:
    def __init__(self):
        self._shms = {}

    def devices(self) -> dict:
        return registry.all_entries()

    def shm(self, dev_id: int):
        path = paths.stats_path(dev_id)
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            self._shms.pop(dev_id, None)
            return None
        cached = self._shms.get(dev_id)
        if cached and cached[0] == ino:
            return cached[1]
        try:
            s = shm_mod.Shm(path).check()
        except (OSError, UblkError):
            return None
        self._shms[dev_id] = (ino, s)
        return s
