"""Device operations behind the CLI verbs: add (spawn a daemon), list, del."""
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

from . import devids, fusedev
from .ctrl import CONTROL_PATH, Control, CtrlError, list_device_ids
from .errors import UblkError
from .recovery import recovery_mode
from .uapi import STATES, feature_names
from .bridge import registry, shm

ADD_TIMEOUT = float(os.environ.get("UBLKSHELL_ADD_TIMEOUT", "120"))


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = [l.strip() for l in f.readlines()[-lines:] if l.strip()]
        return " | ".join(tail)
    except OSError:
        return ""


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


def spawn_daemon(spec: dict, timeout: float = ADD_TIMEOUT, module: str = "ublkshell.bridge.daemon") -> dict:
    """Start an IO daemon for spec (a new device, or `"recover": true` for an
    existing one) in its own session; return what it reports once it serves."""
    log = os.path.join(registry.logdir(), f"daemon-{int(time.time() * 1000)}.log")
    r, w = os.pipe()
    env = dict(os.environ, UBLKSHELL_DAEMON_LOG=log)
    with open(log, "ab", buffering=0) as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--spec", json.dumps(spec),
             "--ready-fd", str(w)],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True, env=env)
    os.close(w)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                raise UblkError(f"the device daemon did not start within {timeout:.0f} s (log: {log})")
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    try:
        msg = json.loads(buf.decode().splitlines()[0]) if buf.strip() else None
    except ValueError:
        msg = None
    if not msg:
        proc.wait(timeout=10)
        raise UblkError(f"the device daemon exited ({proc.returncode}) before serving: "
                        f"{_log_tail(log) or 'see ' + log}")
    if not msg.get("ok"):
        proc.wait(timeout=30)
        raise UblkError(msg.get("error", "the device daemon failed"))
    return msg["device"]


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
        "daemon_alive": registry.pid_alive(int(info.ublksrv_pid)),
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
        d["daemon_alive"] = registry.pid_alive(entry.get("pid"))
        d["pid"] = entry.get("pid", d["pid"])
    return d


def list_devices() -> list[dict]:
    out = []
    fuse = fusedev.list_devices()
    if fuse and not os.path.exists(CONTROL_PATH):
        return fuse  # a kernel without ublk_drv: the FUSE devices are all there is
    with Control() as ctrl:
        for dev_id in list_device_ids():
            try:
                out.append(describe(ctrl, dev_id))
            except CtrlError as e:
                if e.errno != errno.ENODEV:  # deleted while we looked
                    raise
    return out + fuse


def _wait_gone(pid: int, dev_id: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


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
        entry = registry.read(dev_id) or {}
        pid = entry.get("pid") or int(info.ublksrv_pid)
        if registry.pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not _wait_gone(pid, dev_id, timeout):
                # a daemon that cannot drain in time: the kernel's abort path takes over
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, dev_id, 5)
        if dev_id in list_device_ids():
            ctrl.stop_and_delete(dev_id)
        forget(dev_id)


def forget(dev_id: int) -> None:
    """Drop what a deleted device left on the host: its mem data, statistics, registry entry."""
    mem = (registry.read(dev_id) or {}).get("mem_path")
    if mem:
        try:
            os.unlink(mem)
        except FileNotFoundError:
            pass
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
