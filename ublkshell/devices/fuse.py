"""FUSE-transport devices (`add --transport fuse`), for kernels without ublk_drv.

Each one is a file, /run/ublkshell/fuse/fuseN/disk, in a FUSE mount served
by its own daemon (bridge/fuse_daemon.py, IO in native/fuse_transport.c);
with --loop the daemon also attaches that file to a loop device. This module
is the host side: paths, ids, the loop device, list and delete, and cleaning
up after a daemon that is gone (a SIGKILLed daemon leaves its mount, aborted
so that it fails fast, and its loop device behind: `list` and `del` remove
them).
"""
import fcntl
import os
import subprocess

from . import ids as devids
from .. import files, procs
from . import paths, registry
from ..errors import UblkError
from ..kernel import mounts

FUSE_DEV = "/dev/fuse"
DAEMON_MODULE = "ublkshell.bridge.fuse_daemon"


def fuse_dir(create: bool = True):
    return files.sub_dir("fuse", create)


def mount_dir(dev_id: int) -> str:
    return os.path.join(fuse_dir(), devids.name(dev_id))


def disk_path(dev_id: int) -> str:
    return os.path.join(mount_dir(dev_id), "disk")


def preflight() -> None:
    """Fail in the CLI, with one line, before a daemon is spawned."""
    if os.geteuid() != 0:
        raise UblkError("the FUSE transport mounts a file system and attaches loop devices: run it as root")
    try:
        os.close(os.open(FUSE_DEV, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        raise UblkError(f"no {FUSE_DEV}: the FUSE transport needs the kernel's fuse module "
                        "(`modprobe fuse`)") from None
    except OSError as e:
        raise UblkError(f"{FUSE_DEV}: {e.strerror}") from None


# -- ids ------------------------------------------------------------------
def lock() -> int:
    """Held while a daemon picks its id and comes up: two adds never pick the same one."""
    fd = files.open_nofollow(os.path.join(fuse_dir(), ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def claim_id(wanted: int) -> int:
    """The lowest free fuseN (or fuse<wanted>); call with lock() held."""
    taken = registry.all_entries()
    if wanted is not None and wanted >= 0:
        dev_id = devids.fuse_id(wanted)
        if dev_id in taken:
            raise UblkError(f"device {devids.name(dev_id)} exists already")
    else:
        n = 0
        while devids.fuse_id(n) in taken:
            n += 1
        dev_id = devids.fuse_id(n)
    # a daemon killed before it wrote its entry may have left its mount: not ours to keep
    mounts.detach(mount_dir(dev_id))
    return dev_id


# -- the loop device ------------------------------------------------------
def _sys_loop(loopdev: str, name: str):
    try:
        with open(f"/sys/block/{os.path.basename(loopdev)}/{name}") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def loop_backing(loopdev: str):
    """The file loopdev is attached to, None if it is free or gone.

    From sysfs, not LOOP_GET_STATUS64: that asks the backing file system for
    the file's attributes, and a dead FUSE daemon cannot answer."""
    return _sys_loop(loopdev, "loop/backing_file")


def loop_seq(loopdev: str):
    """The loop device's disk sequence number: the kernel gives it a new one for every attach."""
    seq = _sys_loop(loopdev, "diskseq")
    return int(seq) if seq and seq.isdigit() else None


def attach_loop(path: str, block_size: int) -> tuple[str, int | None]:
    """losetup the disk file; returns the loop device and its diskseq (what proves it ours later)."""
    # direct IO: no second page cache under the loop device, and its requests reach the FUSE
    # queue concurrently (buffered, the loop worker serves them one at a time)
    cmd = ["losetup", "--find", "--show", "--direct-io=on", "--sector-size", str(block_size), path]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UblkError("--loop needs losetup (util-linux), which is not installed") from None
    except subprocess.TimeoutExpired:
        raise UblkError("losetup did not finish within 60 s") from None
    dev = p.stdout.strip()
    if p.returncode != 0 or not dev.startswith("/dev/"):
        why = " ".join(p.stderr.split()).removeprefix("losetup: ") or f"exit status {p.returncode}"
        raise UblkError(f"losetup failed: {why}")
    return dev, loop_seq(dev)


def is_our_loop(loopdev, path, seq) -> bool:
    """loopdev still holds the attach we made (its number may have been reused since)."""
    if not loopdev or loop_backing(loopdev) is None:
        return False
    now = loop_seq(loopdev)
    if seq is not None and now is not None:
        return now == seq
    # no diskseq (before 5.15): the path, which a dead FUSE mount shows as "... (deleted)"
    return loop_backing(loopdev).removesuffix(" (deleted)") == path


def detach_loop(loopdev, path, seq) -> bool:
    """losetup -d, if loopdev is still ours. A busy one (mounted) goes when its last user closes it."""
    if not is_our_loop(loopdev, path, seq):
        return False
    p = subprocess.run(["losetup", "-d", loopdev], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise UblkError(f"losetup -d {loopdev} failed: {' '.join(p.stderr.split())}")
    return True


# -- daemons --------------------------------------------------------------
def daemon_alive(entry: dict) -> bool:
    """The entry's pid runs and is its FUSE daemon (not a process that reused the number)."""
    return procs.entry_daemon_alive(entry, (DAEMON_MODULE,))


def clean_after(dev_id: int, entry: dict) -> list[str]:
    """What a gone daemon left: its loop device, then its mount. Returns what was removed."""
    done = []
    if detach_loop(entry.get("loop"), entry.get("file"), entry.get("loop_seq")):
        done.append(entry["loop"])
    mnt = entry.get("mount") or mount_dir(dev_id)
    if mounts.detach(mnt):
        done.append(mnt)
    return done


def forget(dev_id: int) -> None:
    """Drop the files of a deleted device: mem data, statistics, registry entry, mount dir."""
    paths.forget(dev_id)
    try:
        os.rmdir(mount_dir(dev_id))
    except FileNotFoundError:
        pass
    except OSError:
        pass  # still mounted (a lazy detach in progress) or not empty: not ours to force


def describe(dev_id: int, entry: dict) -> dict:
    alive = daemon_alive(entry)
    if not alive and os.geteuid() == 0:
        try:
            clean_after(dev_id, entry)
        except UblkError:
            pass  # shown as dead either way; `del` says what failed
    return {
        "id": dev_id, "name": devids.name(dev_id), "transport": "fuse",
        "state": "LIVE" if alive else "DEAD",
        "queues": entry.get("queues", 1), "depth": entry.get("depth"), "max_io": entry.get("max_io"),
        "pid": entry.get("pid", -1), "flags": [], "size": entry.get("size"),
        "block_size": entry.get("block_size"), "target": entry.get("describe", entry.get("target", "-")),
        "daemon_alive": alive, "file": entry.get("file"), "mount": entry.get("mount"),
        "loop": entry.get("loop") if alive else None,
        # one shape for both transports (docs/schema.md, list_entry): ublk's keys, empty
        "recovery": None, "io_mode": None, "zero_copy": False, "zoned": None,
    }


def list_devices() -> list[dict]:
    return [describe(dev_id, e) for dev_id, e in sorted(registry.all_entries().items())
            if devids.is_fuse(dev_id)]


def ids() -> list[int]:
    return sorted(i for i in registry.all_entries() if devids.is_fuse(i))


def delete(dev_id: int, timeout: float = 20.0) -> None:
    """SIGTERM the daemon (it detaches, unmounts, removes its files); then clean whatever is left."""
    entry = registry.read(dev_id)
    if entry is None:
        # no entry, nothing to touch: its mount may be one a starting daemon is setting up
        raise UblkError(f"device {devids.name(dev_id)} does not exist")
    # a daemon killed when it does not finish in time closes /dev/fuse: the kernel aborts
    # the connection, nothing can hang on it
    procs.stop_daemon(entry.get("pid"), entry.get("pid_start"), timeout, (DAEMON_MODULE,))
    clean_after(dev_id, entry)
    forget(dev_id)


def delete_all() -> list[int]:
    out = ids()
    for dev_id in out:
        delete(dev_id)
    return out

