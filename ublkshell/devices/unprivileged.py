"""Devices added by a user who is not root (UBLK_F_UNPRIVILEGED_DEV; docs/security.md,
"Unprivileged devices").

The kernel makes such a device its adder's: every later control command names
/dev/ublkcN and the kernel checks the caller may open that node. It also refuses
what would let an untrusted daemon reach past its own buffers or hang error
handling: user copy, zero copy and automatic buffer registration are refused at
ADD_DEV, the recovery flags are cleared. So a user's device is served in the plain
copy mode (the kernel copies into the daemon's buffers), and the options that
need the rest are refused before a daemon starts rather than silently dropped.
"""
import errno
import os
import time

from .. import procs
from .._native import lib
from ..errors import UblkError, UsageError

# after ADD_DEV the nodes are root's until the admin's udev rule hands them over
NODE_WAIT = float(os.environ.get("UBLKSHELL_NODE_WAIT", "10"))
UDEV_HINT = ("the admin's udev rule gives a user's /dev/ublkcN to its owner: `ublkshell udev-rules` "
             "prints it (docs/security.md, \"Unprivileged devices\")")


def unprivileged() -> bool:
    """Whether devices this process adds are unprivileged ones (the kernel makes root's
    privileged whatever it asks; a root without CAP_SYS_ADMIN gets EPERM, as before)."""
    return os.geteuid() != 0


def check_spec(spec: dict) -> None:
    """Refuse, in one line, the add options an unprivileged device cannot have."""
    if not unprivileged() or spec.get("transport") == "fuse":
        return
    if spec.get("recovery"):
        raise UsageError("--recovery: a device added by a user who is not root cannot be recovered "
                         "(the kernel clears the recovery flags of unprivileged devices)")
    if spec.get("zero_copy") in ("on", "fallback"):
        raise UsageError(f"--zero-copy {spec['zero_copy']}: a device added by a user who is not root "
                         "cannot use zero copy (the kernel refuses it for unprivileged devices); "
                         "use --zero-copy auto or off")


def check_kernel(features: int) -> None:
    """A user's device needs the kernel to offer it, and to say so: where GET_FEATURES is
    missing (before 6.5) no later command would carry the device's path, and a device
    added there would be left, out of its owner's reach, until root deleted it."""
    if unprivileged() and not features & lib.UBLK_F_UNPRIVILEGED_DEV:
        raise UblkError("this kernel's ublk_drv does not offer devices to users who are not root "
                        "(UBLK_F_UNPRIVILEGED_DEV through GET_FEATURES, Linux 6.5 and later)")


def add_flags(flags: int) -> int:
    """ADD_DEV flags for this caller: the unprivileged bit for a user, and none of those
    the kernel refuses with it (zero copy `auto` then means off)."""
    if not unprivileged():
        return flags
    refused = lib.UBLK_F_USER_COPY | lib.UBLK_F_SUPPORT_ZERO_COPY | lib.UBLK_F_AUTO_BUF_REG
    return (flags & ~refused) | lib.UBLK_F_UNPRIVILEGED_DEV


def wait_for_node(path: str, timeout: float = NODE_WAIT) -> int:
    """Open path read-write once it exists and is ours; a bounded wait for udev."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
                raise UblkError(f"{path}: {e.strerror}") from None
            if time.monotonic() > deadline:
                if e.errno == errno.ENOENT:
                    raise UblkError(f"{path} did not appear after ADD_DEV") from None
                raise UblkError(f"{path} is still not yours {timeout:.0f} s after ADD_DEV: "
                                f"{UDEV_HINT}") from None
            time.sleep(0.05)


def open_cdev(dev_id: int) -> int:
    """/dev/ublkcN of a device this user just added, once udev handed it over."""
    try:
        return wait_for_node(f"/dev/ublkc{dev_id}")
    except UblkError as e:
        raise UblkError(f"{e}; device {dev_id} is left for root to delete "
                        f"(`ublkshell del {dev_id}` as root)") from None


def wait_for_disk(dev_id: int, log, timeout: float = NODE_WAIT) -> None:
    """`add` returns once the user can open their disk (made at START_DEV), where udev
    hands it over in time; if not, the device serves anyway and the log says why."""
    path = f"/dev/ublkb{dev_id}"
    deadline = time.monotonic() + timeout
    while not os.access(path, os.R_OK | os.W_OK):
        if time.monotonic() > deadline:
            log(f"dev {dev_id}: {path} is still not ours: {UDEV_HINT}")
            return
        time.sleep(0.05)


def believed_pid(info) -> tuple[int, int | None]:
    """The daemon pid (and its start time) a device's info names, if it may be believed.

    START_DEV takes the pid from its caller: the owner of an unprivileged device can
    name any process, e.g. another user's ublkshell daemon, for root's `del` to signal.
    Only a process running as the device's owner is believed; otherwise -1 (no signal:
    root's STOP_DEV and DEL_DEV delete the device all the same)."""
    pid = int(info.ublksrv_pid)
    if not info.flags & lib.UBLK_F_UNPRIVILEGED_DEV:
        return pid, None
    start = procs.start_time(pid)
    try:
        uid = os.stat(f"/proc/{pid}").st_uid if pid > 0 else -1
    except OSError:
        return -1, None
    # the start time read before the owner: a pid reused since is refused by stop_daemon
    return (pid, start) if uid == int(info.owner_uid) and start is not None else (-1, None)
