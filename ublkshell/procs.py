"""Which processes are ours, and signals that reach only them.

A pid in a registry entry (or the kernel's ublksrv_pid) may belong to another
process by the time we act on it: the daemon died and the number was reused.
A daemon records its start time (/proc/PID/stat field 22) beside its pid; a
signal goes out only through a pidfd opened first and then checked against
that start time and the daemon's command line, so it cannot reach a process
that merely inherited the number."""
import os
import signal
import time

DAEMON_MODULES = ("ublkshell.bridge.daemon", "ublkshell.bridge.fuse_daemon")
PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT


def _pid_ok(pid) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < PID_MAX


def _stat_fields(pid: int):
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            # comm may hold spaces and parentheses: the fields start after the last ')'
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid) -> int | None:
    """When pid started (clock ticks since boot): with the pid, a process's identity."""
    f = _stat_fields(pid) if _pid_ok(pid) else None
    try:
        return int(f[19]) if f else None
    except (IndexError, ValueError):
        return None


def alive(pid) -> bool:
    """pid runs and is not a zombie waiting to be reaped."""
    if not _pid_ok(pid):
        return False
    f = _stat_fields(pid)
    return bool(f) and f[0] not in (b"Z", b"X")


def same_process(pid, start) -> bool:
    """The process that had this pid and start time still exists (exiting counts, a zombie not)."""
    return alive(pid) and (start is None or start_time(pid) == start)


def me() -> dict:
    """What a daemon records about itself so that others can tell it from a successor."""
    return {"pid": os.getpid(), "pid_start": start_time(os.getpid())}


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def is_daemon(pid, start=None, modules=DAEMON_MODULES) -> bool:
    """pid is one of our device daemons (started at `start`, when known). A daemon
    that is exiting has no command line left: it no longer counts as one."""
    if not alive(pid):
        return False
    if isinstance(start, int) and start_time(pid) != start:
        return False
    args = _cmdline(pid)
    return any(m.encode() in args for m in modules)


def is_foreign(pid, modules=DAEMON_MODULES) -> bool:
    """pid runs a program (it has a command line) that is not one of our daemons."""
    if not alive(pid):
        return False
    args = _cmdline(pid)
    return args != [b""] and bool(args) and not any(m.encode() in args for m in modules)


def entry_daemon_alive(entry: dict, modules=DAEMON_MODULES) -> bool:
    """The daemon a registry entry names still runs (not a process that reused its pid)."""
    return is_daemon(entry.get("pid"), entry.get("pid_start"), modules)


def signal_daemon(pid, sig: int, start=None, modules=DAEMON_MODULES) -> bool:
    """Send sig to pid only if it is our daemon; False if it is not (or gone)."""
    if not _pid_ok(pid):
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        # checked after the pidfd pins the process: a pid reused after this check
        # cannot receive the signal, the pidfd still names the process we checked
        if not is_daemon(pid, start, modules):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def signal_entry(entry: dict, sig: int, modules=DAEMON_MODULES) -> bool:
    return signal_daemon(entry.get("pid"), sig, entry.get("pid_start"), modules)


def wait_gone(pid, start, timeout: float, interval: float = 0.05) -> bool:
    """Until the process (this pid and start time) has gone, not only until it stops looking
    like a daemon: an exiting process has no command line left but still holds its files."""
    deadline = time.monotonic() + timeout
    while same_process(pid, start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def stop_daemon(pid, start, timeout: float, modules=DAEMON_MODULES) -> bool:
    """SIGTERM our daemon (it releases what it withholds, stops and removes its device),
    SIGKILL it if it does not finish in time. False if pid is not our daemon."""
    if start is None and is_daemon(pid, None, modules):
        start = start_time(pid)  # from here on, this process and no successor
    if not signal_daemon(pid, signal.SIGTERM, start, modules):
        return False
    if not wait_gone(pid, start, timeout):
        # a daemon that cannot finish in time: killing it lets the kernel's abort path take over
        signal_daemon(pid, signal.SIGKILL, start, modules)
        wait_gone(pid, start, 5)
    return True
