"""Mounting the stats tree (default /mnt/ublkstats) and taking it down: a dead mount a
crashed server left is detached first, and nothing stays mounted when the tree stops."""
import os

import pyfuse3
import trio

from ...errors import UblkError
from ...kernel.mounts import detach_dead, is_mounted
from .content import DeviceSource
from .ops import StatsTree

FSNAME = "ublkstats"


_active = False


async def run_tree(mountpoint: str, source: DeviceSource, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount the stats tree on mountpoint and serve it until cancelled; then
    unmount. Calls task_status.started() once the mount is in place."""
    global _active
    if _active:
        # pyfuse3 keeps its session in module globals: one tree per process
        raise UblkError("the stats tree is already mounted by this process")
    _active = True
    try:
        await _mount_and_serve(os.path.abspath(mountpoint), source, task_status)
    finally:
        _active = False


async def _mount_and_serve(mp: str, source: DeviceSource, task_status) -> None:
    await trio.to_thread.run_sync(detach_dead, mp)
    try:
        os.makedirs(mp, mode=0o755, exist_ok=True)
    except OSError as e:
        raise UblkError(f"{mp}: cannot create the mount point: {e.strerror}") from None
    if not os.path.isdir(mp):
        raise UblkError(f"{mp}: not a directory")
    if is_mounted(mp):
        raise UblkError(f"{mp}: something is already mounted there (another server?)")
    ops = StatsTree(source)
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}"}
    try:
        pyfuse3.init(ops, mp, options)
    except RuntimeError as e:
        if "mount" in str(e):
            pyfuse3.close(unmount=False)  # the session exists, only the mount failed
        need = "root and /dev/fuse" if os.geteuid() == 0 else "read-write /dev/fuse and the setuid fusermount3"
        raise UblkError(f"{mp}: cannot mount the stats tree ({e}); it needs {need}") from None
    try:
        task_status.started()
        try:
            await pyfuse3.main()
        except* OSError as group:
            # pyfuse3 runs its workers in a nursery: failures come grouped
            e = group
            while isinstance(e, BaseExceptionGroup):
                e = e.exceptions[0]
            raise UblkError(f"stats tree on {mp} stopped: {getattr(e, 'strerror', None) or e}") from None
    finally:
        ops.handles.clear()
        ops.dirs.clear()
        pyfuse3.close(unmount=True)
