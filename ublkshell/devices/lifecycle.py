"""Device operations behind the CLI verbs: add (spawn a daemon), list, del."""
import errno
import os

from . import fuse as fusedev, ids as devids, paths, registry, spawn, unprivileged
from .. import procs
from .._native import lib
from ..kernel.ctrl import CONTROL_PATH, Control, CtrlError, list_device_ids
from ..errors import UblkError
from .io_modes import io_mode_of, zero_copy_of
from .recovery_modes import recovery_mode
from ..kernel.uapi import STATES, feature_names

def add(spec: dict, timeout: float = spawn.ADD_TIMEOUT) -> dict:
    """Spawn the device's IO daemon and wait until it serves (or says why not)."""
    if spec.get("transport") == "fuse":
        fusedev.preflight()
        module = fusedev.DAEMON_MODULE
    else:
        unprivileged.check_spec(spec)
        # fail here, with the driver hint, rather than inside the daemon
        with Control() as ctrl:
            unprivileged.check_kernel(ctrl.features)
        module = spawn.DAEMON_MODULE
    return spawn.spawn_daemon(spec, timeout, module)


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
        "io_mode": io_mode_of(int(info.flags)),
        "zero_copy": zero_copy_of(int(info.flags)),
        # one shape for both transports (docs/schema.md, list_entry): FUSE's keys, empty
        "file": None, "mount": None, "loop": None,
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
    # zoned: the geometry its daemon recorded (conventional zones are only known there)
    d["zoned"] = (entry or {}).get("zoned") if info.flags & lib.UBLK_F_ZONED else None
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
                if e.errno == errno.ENODEV:  # deleted while we looked
                    continue
                # a user sees their own devices only: root's (EPERM) and other users'
                # (EACCES on their /dev/ublkcN) are the kernel's to refuse
                if e.errno in (errno.EPERM, errno.EACCES) and unprivileged.unprivileged():
                    continue
                raise
    return out + fuse


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
            procs.stop_daemon(entry["pid"], entry.get("pid_start"), timeout)
        else:
            # no entry (a daemon killed before writing it, or another user's device): the
            # kernel's pid, only if it is ours
            pid, start = unprivileged.believed_pid(info)
            if os.geteuid() == 0 and info.flags & lib.UBLK_F_UNPRIVILEGED_DEV:
                # a user's daemon: STOP_DEV ends it; root signals no process a user named
                pid, start = -1, None
            procs.stop_daemon(pid, start, timeout)
        if dev_id in list_device_ids():
            ctrl.stop_and_delete(dev_id)
        paths.forget(dev_id)


def delete_all() -> list[int]:
    if unprivileged.unprivileged():
        # a user's "all" is their own devices, never an attempt on everyone else's
        ids = [d["id"] for d in list_devices() if d["transport"] == "ublk"]
    else:
        ids = list_device_ids()
    for dev_id in ids:
        delete(dev_id)
    return ids + fusedev.delete_all()


def features() -> int:
    with Control() as ctrl:
        return ctrl.features
