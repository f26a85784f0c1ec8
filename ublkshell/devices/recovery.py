"""Daemon death and recovery: `kill` (SIGKILL a device's IO daemon, so the
kernel's abort path runs for real) and `recover` (a fresh daemon takes the
device over with START_USER_RECOVERY / END_USER_RECOVERY).

What the kernel does meanwhile depends on the flags the device was added
with (`add --recovery[=MODE]`); docs/design.md has what we observed."""
import errno
import os
import signal
import time

from . import ids as devids
from .. import procs
from .._native import lib
from ..kernel.ctrl import Control, CtrlError
from ..errors import UblkError
from ..kernel.uapi import STATES
from . import registry, spawn
from .recovery_modes import recovery_mode
from .unprivileged import believed_pid

# how long `kill` waits for the daemon to go and for the kernel to notice
KILL_WAIT = float(os.environ.get("UBLKSHELL_KILL_WAIT", "15"))


def _ublk_only(dev_id: int) -> None:
    if devids.is_fuse(dev_id):
        raise UblkError(f"{devids.name(dev_id)} uses the FUSE transport: kill and recover are the "
                        "kernel's ublk abort and recovery paths")


def _info(ctrl: Control, dev_id: int):
    try:
        return ctrl.get_dev_info(dev_id)
    except CtrlError as e:
        if e.errno == errno.ENODEV:
            raise UblkError(f"device {devids.name(dev_id)} does not exist") from None
        raise


def _serving(info, entry: dict):
    """(pid, start) of the device's live daemon of ours, (0, None) if none: the registry's,
    else the kernel's ublksrv_pid when that is one of our daemons."""
    if procs.entry_daemon_alive(entry, (spawn.DAEMON_MODULE,)):
        return entry["pid"], entry.get("pid_start")
    # an unprivileged device's pid is its owner's word (unprivileged.believed_pid)
    pid, start = believed_pid(info)
    if procs.is_daemon(pid, start, (spawn.DAEMON_MODULE,)):
        return pid, start or procs.start_time(pid)
    return 0, None


def _foreign_server(info) -> int:
    """The kernel's ublk server for the device if it runs and is not ours."""
    pid = int(info.ublksrv_pid)
    return pid if procs.is_foreign(pid, (spawn.DAEMON_MODULE,)) else 0


def kill(dev_id: int, timeout: float = KILL_WAIT) -> dict:
    """SIGKILL the device's IO daemon and wait until the kernel has reacted."""
    _ublk_only(dev_id)
    with Control() as ctrl:
        info = _info(ctrl, dev_id)
        entry = registry.read(dev_id)
        if entry is None:
            raise UblkError(f"device {devids.name(dev_id)} is not served by ublkshell: not killing its server")
        pid, start = _serving(info, entry)
        if not pid:
            if _foreign_server(info):
                raise UblkError(f"device {devids.name(dev_id)}: pid {int(info.ublksrv_pid)} is not a ublkshell daemon: "
                                "not killing it")
            raise UblkError(f"device {devids.name(dev_id)} has no live daemon ({STATES.get(info.state, info.state)}): "
                            "nothing to kill")
        # the server tells a kill from a crash by this mark
        registry.write(dev_id, dict(entry, killed_pid=pid, killed_at=time.time()))
        t0 = time.monotonic()
        procs.signal_daemon(pid, signal.SIGKILL, start, (spawn.DAEMON_MODULE,))
        deadline = t0 + timeout
        procs.wait_gone(pid, start, timeout, interval=0.02)
        # the kernel reacts once the dead daemon's rings let go of /dev/ublkcN
        state = None
        while time.monotonic() < deadline:
            try:
                state = int(ctrl.get_dev_info(dev_id).state)
            except CtrlError as e:
                if e.errno != errno.ENODEV:
                    raise
                state = None
                break
            if state != lib.UBLK_S_DEV_LIVE:
                break
            time.sleep(0.02)
        return {"id": dev_id, "device": devids.name(dev_id), "pid": pid, "daemon_gone": not procs.same_process(pid, start),
                "state": STATES.get(state, "GONE" if state is None else str(state)),
                "recovery": recovery_mode(int(info.flags)),
                "seconds": round(time.monotonic() - t0, 3)}


def render_kill(r: dict) -> str:
    i = devids.name(r["id"])
    head = f"dev {i}: daemon {r['pid']} killed"
    if not r["daemon_gone"]:
        return f"{head}, but it has not exited yet"
    what = {
        "QUIESCED": f"IO waits for `recover {i}`",
        "FAIL_IO": f"IO fails (EREMOTEIO) until `recover {i}`",
        "DEAD": f"IO in flight failed, the disk is gone; `del {i}` removes the rest",
        "LIVE": "the kernel has not noticed yet",
        "GONE": "the device is gone",
    }.get(r["state"], "")
    return f"{head}; device {r['state']}" + (f": {what}" if what else "")


def check_recoverable(dev_id: int) -> dict:
    """The registry entry of a device a new daemon may take over; one-line errors otherwise."""
    _ublk_only(dev_id)
    with Control() as ctrl:
        info = _info(ctrl, dev_id)
        entry = registry.read(dev_id)
        if not info.flags & lib.UBLK_F_USER_RECOVERY:
            raise UblkError(f"device {devids.name(dev_id)} was added without --recovery: it cannot be recovered "
                            f"(delete it: `del {devids.name(dev_id)}`)")
        if entry is None:
            raise UblkError(f"device {devids.name(dev_id)} is not served by ublkshell: nothing to recover it from")
        pid = _serving(info, entry)[0] or _foreign_server(info)
        if pid:
            raise UblkError(f"device {devids.name(dev_id)} is served by a live daemon (pid {pid}): "
                            f"nothing to recover (`kill {devids.name(dev_id)}` first)")
        if info.state == lib.UBLK_S_DEV_DEAD:
            raise UblkError(f"device {devids.name(dev_id)} is stopped (DEAD): it cannot be recovered, only deleted")
        return entry


def recover(dev_id: int) -> dict:
    """Start a fresh daemon on a device whose daemon died; return its registry entry."""
    entry = check_recoverable(dev_id)
    spec = dict(entry["spec"], dev_id=dev_id, recover=True,
                recoveries=int(entry.get("recoveries", 0)) + 1)
    t0 = time.monotonic()
    dev = spawn.spawn_daemon(spec)
    dev["old_pid"] = entry.get("pid")
    dev["seconds"] = round(time.monotonic() - t0, 3)
    return dev


def render_recover(dev: dict) -> str:
    lost = f"; {dev['abandoned']} IOs were being served when it died" if dev.get("abandoned") else ""
    return (f"dev {devids.name(dev['id'])}: recovered by daemon {dev['pid']} (was {dev['old_pid']}), "
            f"recovery #{dev['recoveries']}, {dev['seconds']:.1f} s{lost}")
