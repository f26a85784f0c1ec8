"""`ublkshell udev add|remove NAME` and `ublkshell udev-rules`: the admin's side of
unprivileged devices (docs/security.md, "Unprivileged devices").

After ADD_DEV (and START_DEV, for the block device) the kernel's nodes are root's.
udev runs `ublkshell udev add ublkcN` (and `... ublkbN`) as root; for a device a
user added (UBLK_F_UNPRIVILEGED_DEV) that hands the node to the owner the kernel
recorded at ADD_DEV, and nothing else: root's devices stay root's, the name is
checked strictly, no path a user chose is ever followed, nothing runs a shell.
"""
import errno
import os
import re
import stat
import sys

from ..errors import UblkError, UsageError

# device ids are minors of one char major (UBLK_MINORS): 20 bits
MAX_ID = (1 << 20) - 1
_NAME = re.compile(r"ublk([bc])(0|[1-9][0-9]{0,6})", re.ASCII)
ACTIONS = ("add", "remove")
# the node's mode once handed over: the owner's only. The kernel lets only the owner
# (uid and gid both) open an unprivileged block device, and every control command on
# the device is checked against /dev/ublkcN: group access would let everyone who
# shares the owner's primary group stop or delete the device.
NODE_MODE = 0o600
RULES_FILE = "99-ublkshell.rules"
DEFAULT_GROUP = "ublk"

RULES = """\
# ublkshell: ublk devices of users who are not root (docs/security.md, "Unprivileged devices").
# Install as /etc/udev/rules.d/{rules_file}, then `udevadm control --reload`.
# Members of group {group} may add ublk devices of their own:
KERNEL=="ublk-control", GROUP="{group}", MODE="0660", OPTIONS+="static_node=ublk-control"
# A device a user added is handed to that user (root's devices stay root's):
ACTION=="add", SUBSYSTEM=="ublk-char", KERNEL=="ublkc[0-9]*", RUN+="{exe} udev add %k"
ACTION=="add", SUBSYSTEM=="block", ENV{{DEVTYPE}}=="disk", KERNEL=="ublkb[0-9]*", RUN+="{exe} udev add %k"
"""


def _shown(name: str) -> str:
    # argv may hold anything (non-UTF-8 comes as surrogates): one printable, bounded line
    return ascii(name[:40]) + ("..." if len(name) > 40 else "")


def parse_name(name: str) -> tuple[str, int]:
    """'ublkc3' -> ('c', 3); anything else is a UsageError (one line)."""
    m = _NAME.fullmatch(name) if len(name) <= 12 else None
    if m is None or int(m.group(2)) > MAX_ID:
        raise UsageError(f"udev: {_shown(name)} is not a ublk device name (ublkcN or ublkbN)")
    return m.group(1), int(m.group(2))


def rules(exe: str | None = None, group: str = DEFAULT_GROUP) -> str:
    if exe is None:
        if any(c.isspace() or c in "\"'\\%$" for c in sys.executable):
            raise UblkError(f"{sys.executable!r}: udev cannot run a program whose path has spaces, "
                            "quotes or % in it: install ublkshell elsewhere")
        _root_only(os.path.realpath(sys.executable))
        _root_only(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # -I: no PYTHON* variables, no user site, no script directory decide what root runs
        exe = f"{sys.executable} -I -m ublkshell"
    return RULES.format(rules_file=RULES_FILE, group=group, exe=exe)


def _root_only(path: str) -> None:
    """udev runs the rule's program as root for every ublk device: refuse to name one that
    a user could change (a checkout or venv of theirs), or any directory above it."""
    p = path
    while True:
        st = os.stat(p)
        if st.st_uid != 0 or st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            raise UblkError(f"{p} is not root's alone (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): "
                            f"udev would run {path} as root; install ublkshell where only root can write")
        if p == "/":
            return
        p = os.path.dirname(p)


def hand_over(kind: str, dev_id: int) -> str:
    """Give /dev/ublk{kind}{dev_id} to the user who added the device, if a user did."""
    from .._native import lib
    from ..kernel.ctrl import Control, CtrlError

    path = f"/dev/ublk{kind}{dev_id}"
    # the node first, then the kernel's word on it: a device deleted and added again in
    # between leaves us holding the old, unlinked inode, whose owner no longer matters
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{path}: gone"
    except OSError as e:
        raise UblkError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        want = stat.S_ISCHR if kind == "c" else stat.S_ISBLK
        if not want(st.st_mode):
            raise UblkError(f"{path}: not a {'character' if kind == 'c' else 'block'} device: left alone")
        with Control() as ctrl:
            try:
                info = ctrl.get_dev_info(dev_id)
                params = ctrl.get_params(dev_id)
            except CtrlError as e:
                if e.errno == errno.ENODEV:
                    return f"{path}: device {dev_id} is gone"
                raise
        if not info.flags & lib.UBLK_F_UNPRIVILEGED_DEV:
            return f"{path}: root's device: left as it is"
        d = params.devt
        rdev = os.makedev(d.char_major, d.char_minor) if kind == "c" else os.makedev(d.disk_major, d.disk_minor)
        if st.st_rdev != rdev:
            raise UblkError(f"{path}: not device {dev_id}'s node: left alone")
        uid, gid = int(info.owner_uid), int(info.owner_gid)
        # the inode we checked, never a path someone could swap: O_PATH fds take no
        # fchown, their /proc/self/fd link does
        os.chown(f"/proc/self/fd/{fd}", uid, gid)
        os.chmod(f"/proc/self/fd/{fd}", NODE_MODE)
        return f"{path}: given to uid {uid} gid {gid}, mode {NODE_MODE:04o}"
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """`udev ACTION NAME` (udev's RUN) and `udev-rules [--group G]`: one-line errors."""
    def _error(e) -> None:
        # udev's log, not a terminal: no colour
        print(f"ublkshell: {e}", file=sys.stderr)

    try:
        if argv[:1] == ["udev-rules"]:
            rest = argv[1:]
            group = DEFAULT_GROUP
            if rest[:1] == ["--group"] and len(rest) == 2 and re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", rest[1]):
                group = rest[1]
            elif rest:
                raise UsageError("udev-rules: usage: ublkshell udev-rules [--group NAME]")
            sys.stdout.write(rules(group=group))
            return 0
        if len(argv) != 3 or argv[1] not in ACTIONS:
            raise UsageError("udev: usage: ublkshell udev add|remove ublkcN|ublkbN (run by udev, as root)")
        kind, dev_id = parse_name(argv[2])
        if argv[1] == "remove":
            return 0  # the kernel removed the node; nothing of ours is left to undo
        if os.geteuid() != 0:
            raise UblkError("udev: only root hands devices to their owners (udev runs this)")
        print(hand_over(kind, dev_id), file=sys.stderr)
        return 0
    except UsageError as e:
        _error(e)
        return 2
    except UblkError as e:
        _error(e)
        return 1
    except OSError as e:
        _error(f"udev: {e.strerror}")
        return 1
