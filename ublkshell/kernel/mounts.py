"""What is mounted where (the mount table) and taking mounts away: the stats tree and the
FUSE transport both need to see, and detach, mounts whose FUSE daemon is gone."""
import errno
import os

from .._native import lib
from ..errors import UblkError


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(mountpoint: str) -> bool:
    """Whether anything is mounted on mountpoint (a dead FUSE mount included,
    which os.path.ismount cannot tell: stat fails on it with ENOTCONN)."""
    mp = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(len(fields) > 4 and _unescape(fields[4]) == mp
                       for fields in (line.split() for line in f))
    except OSError:
        return os.path.ismount(mp)


def detach(path: str) -> bool:
    """Detach whatever is mounted on path, lazily: the kernel finds the mount without
    asking its file system anything, so a FUSE mount whose daemon died cannot hang this.
    True if something was detached."""
    if not is_mounted(path):
        return False
    rc = lib.us_umount_lazy(os.path.abspath(path).encode())
    if rc < 0 and rc != -errno.EINVAL:
        raise UblkError(f"cannot unmount {path}: {os.strerror(-rc)}")
    return True


def is_dead(path: str) -> bool:
    """A FUSE mount whose daemon is gone: every access gives ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def detach_dead(path: str) -> bool:
    """Detach the dead FUSE mounts on path (crashes can stack several); a live mount
    stays. True if path is usable again after detaching at least one."""
    cleaned = False
    for _ in range(8):
        if not is_dead(path):
            break
        try:
            cleaned = detach(path) or cleaned
        except UblkError:
            break
    return cleaned and not is_dead(path)
