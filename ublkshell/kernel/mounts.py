"""What is mounted where, read from the mount table: the stats tree and the
FUSE transport both need to see mounts whose FUSE daemon is gone."""
import os


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
