"""Device operations behind the CLI verbs: add (spawn a daemon), list, del."""
import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from . import ids as devids, fuse as fusedev
from .. import files, procs
from ..kernel.ctrl import CONTROL_PATH, Control, CtrlError, list_device_ids
from ..errors import UblkError
from .recovery import recovery_mode
from ..kernel.uapi import STATES, feature_names
from . import registry
from ..observe import shm

ADD_TIMEOUT = float(os.environ.get("UBLKSHELL_ADD_TIMEOUT", "120"))


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(l.strip() for l in text.splitlines()[-lines:] if l.strip())


def add(spec: dict, timeout: float = ADD_TIMEOUT) -> dict:
    """Spawn the device's IO daemon and wait until it serves (or says why not)."""
    if spec.get("transport") == "fuse":
        fusedev.preflight()
        module = fusedev.DAEMON_MODULE
    else:
        with Control():
            pass  # fail here, with the driver hint, rather than inside the daemon
        module = "ublkshell.bridge.daemon"
    return spawn_daemon(spec, timeout, module)


def daemon_command(module: str) -> tuple[list[str], dict]:
    """argv and environment for `python -m module`, importing this very ublkshell.

    `python -m` puts the working directory first on sys.path: started from a
    source checkout, a daemon would import the checkout instead of the
    installed package (and fail without its compiled extension). -P drops
    that entry, PYTHONPATH names the directory this ublkshell came from, and
    the daemon runs in / so that it holds no directory of any filesystem."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return [sys.executable, "-P", "-m", module], env


def spawn_daemon(spec: dict, timeout: float = ADD_TIMEOUT, module: str = "ublkshell.bridge.daemon") -> dict:
    """Start an IO daemon for spec (a new device, or `"recover": true` for an
    existing one) in its own session; return what it reports once it serves."""
    # O_EXCL, mode 0600, a name nobody can take first
    fd, log = tempfile.mkstemp(dir=registry.logdir(), prefix=f"daemon-{int(time.time() * 1000)}-",
                               suffix=".log")
    r, w = os.pipe()
    argv, env = daemon_command(module)
    env["UBLKSHELL_DAEMON_LOG"] = log
    try:
        proc = subprocess.Popen(
            argv + ["--spec", json.dumps(spec), "--ready-fd", str(w)],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/",
            start_new_session=True, env=env)
    finally:
        os.close(fd)
        os.close(w)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                # our own child, not yet reaped: its pid (and process group) cannot be reused
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise UblkError(f"the device daemon did not start within {timeout:.0f} s (log: {log})")
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 1 << 20:
                    break
    finally:
        os.close(r)
    try:
        msg = json.loads(buf.decode().splitlines()[0]) if buf.strip() else None
    except (ValueError, UnicodeDecodeError):
        msg = None
    if not isinstance(msg, dict):
        _reap(proc)
        raise UblkError(f"the device daemon exited ({proc.returncode}) before serving: "
                        f"{_log_tail(log) or 'see ' + log}")
    if not msg.get("ok"):
        _reap(proc)
        raise UblkError(str(msg.get("error") or "the device daemon failed"))
    return msg["device"]


def _reap(proc) -> None:
    """A daemon that said it failed exits on its own; one that hangs on its way out is killed."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def describe(ctrl: Control, dev_id: int) -> dict:
    """The kernel's view of one device, joined with what its daemon recorded."""
    info = ctrl.get_dev_info(dev_id)
    d = {
        "id": dev_id,
        "name": devids.name(dev_id),
        "transport": "ublk",
        "state": STATES.get(info.state, str(info.state)),
        "queues": int(info.nr_hw_queues),
        "depth": int(info.queue_depth),
        "max_io": int(info.max_io_buf_bytes),
        "pid": int(info.ublksrv_pid),
        "flags": feature_names(int(info.flags)),
        "size": None,
        "block_size": None,
        "target": "-",
        "daemon_alive": procs.is_daemon(int(info.ublksrv_pid)),
        "recovery": recovery_mode(int(info.flags)),
    }
    try:
        p = ctrl.get_params(dev_id)
        d["size"] = int(p.basic.dev_sectors) << 9
        d["block_size"] = 1 << p.basic.logical_bs_shift
    except CtrlError:
        pass
    entry = registry.read(dev_id)
    if entry:
        d["target"] = entry.get("describe", entry.get("target", "-"))
        d["daemon_alive"] = procs.entry_daemon_alive(entry)
        d["pid"] = entry.get("pid", d["pid"])
    return d


def list_devices() -> list[dict]:
    out = []
    fuse = fusedev.list_devices()
    if not os.path.exists(CONTROL_PATH):
        return fuse  # a kernel without ublk_drv: the FUSE devices are all there is
    with Control() as ctrl:
        for dev_id in list_device_ids():
            try:
                out.append(describe(ctrl, dev_id))
            except CtrlError as e:
                if e.errno != errno.ENODEV:  # deleted while we looked
                    raise
    return out + fuse


def _wait_gone(pid: int, start, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.same_process(pid, start):
            return True
        time.sleep(0.05)
    return False


def stop_daemon(pid: int, start, timeout: float) -> bool:
    """SIGTERM our daemon (it releases what it withholds, stops and deletes its device),
    SIGKILL it if it does not finish in time. False if pid is not our daemon."""
    if start is None and procs.is_daemon(pid):
        start = procs.start_time(pid)  # from here on, this process and no successor
    if not procs.signal_daemon(pid, signal.SIGTERM, start):
        return False
    if not _wait_gone(pid, start, timeout):
        # a daemon that cannot drain in time: the kernel's abort path takes over
        procs.signal_daemon(pid, signal.SIGKILL, start)
        _wait_gone(pid, start, 5)
    return True


def delete(dev_id: int, timeout: float = 20.0) -> None:
    """Delete one device: ask its daemon (SIGTERM), else do it ourselves."""
    if devids.is_fuse(dev_id):
        return fusedev.delete(dev_id, timeout)
    with Control() as ctrl:
        try:
            info = ctrl.get_dev_info(dev_id)
        except CtrlError as e:
            if e.errno == errno.ENODEV:
                registry.remove(dev_id)
                raise UblkError(f"device {dev_id} does not exist") from None
            raise
        entry = registry.read(dev_id)
        if entry is not None:
            stop_daemon(entry["pid"], entry.get("pid_start"), timeout)
        else:
            # no entry (a daemon killed before writing it): the kernel's pid, only if it is ours
            stop_daemon(int(info.ublksrv_pid), None, timeout)
        if dev_id in list_device_ids():
            ctrl.stop_and_delete(dev_id)
        forget(dev_id)


def forget(dev_id: int) -> None:
    """Drop what a deleted device left on the host: its mem data, statistics, registry entry.
    Only files of ours, by the names we give them: never a path read from a file."""
    from .targets import mem_path

    files.unlink_quiet(mem_path(dev_id, create=False))
    shm.remove(dev_id)
    registry.remove(dev_id)


def delete_all() -> list[int]:
    ids = list_device_ids()
    for dev_id in ids:
        delete(dev_id)
    return ids + fusedev.delete_all()


def features() -> int:
    with Control() as ctrl:
        return ctrl.features
