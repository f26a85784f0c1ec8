"""The IO daemon of a FUSE-transport device (`add --transport fuse`).

`python -m ublkshell.bridge.fuse_daemon --spec JSON --ready-fd N` picks the
device's id (fuseN), opens the target, creates the device's shared memory,
mounts the FUSE file system whose one file, `disk`, is the device (served by
native worker threads, native/fuse_transport.c), attaches it to a loop device
when asked (--loop), writes its registry entry and tells the spawner (one
JSON line on the ready fd, as bridge/daemon.py does). Then it only waits: the
IO never enters Python.

SIGTERM means "delete the device": detach the loop device, unmount (the
workers see the connection end), remove the device's files. If the disk is
still in use (a file system mounted on the loop device), the mount is
detached lazily and this process's exit aborts the FUSE connection: its
users get IO errors, never a hang. SIGKILL leaves the mount and the loop
device behind, dead but harmless; `ublkshell list` and `del` remove them.
"""
import os
import signal
import sys
import time

from ..devices import ids as devids, fuse as fusedev
from .. import files, procs
from .._native import ffi, lib
from ..errors import UblkError
from ..devices.targets import make_target
from ..devices import registry
from ..observe import shm

# FUSE worker threads: the host has few cores and each request is a short copy
MAX_THREADS = 16
_stop = []
_powercut = []


def _on_signal(signum, frame):
    _stop.append(signum)


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} ublkshell-fuse-daemon[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class FuseDaemon:
    def __init__(self, spec: dict):
        self.spec = spec
        self.target = make_target(spec)
        self.dev_id = -1
        self.fuse = ffi.NULL
        self.stats = None
        self.mount = None
        self.disk = None
        self.loopdev = None
        self.loop_seq = None
        self.logw = None    # --log-writes (crash/logdevice.py)
        self.served = False

    @property
    def name(self) -> str:
        return devids.name(self.dev_id)

    def start(self) -> dict:
        lock = fusedev.lock()
        try:
            return self._start()
        except BaseException:
            # still under the lock: nobody else may take this id while its leftovers go
            self.teardown(delete=True)
            raise
        finally:
            os.close(lock)

    def _start(self) -> dict:
        spec = self.spec
        self.dev_id = fusedev.claim_id(spec.get("dev_id", -1))
        self.target.open()
        self.target.attach(self.dev_id)
        depth = spec["depth"]
        self.stats = shm.create(self.dev_id, 1, depth, spec.get("records", shm.DEFAULT_RECORDS),
                                os.getpid())
        self.mount = fusedev.mount_dir(self.dev_id)
        files.private_dir(self.mount)

        cfg = ffi.new("struct us_fuse_cfg *")
        cfg.target = self.target.kind
        cfg.backing_fd = self.target.fd
        cfg.dev_bytes = self.target.size
        cfg.block_size = self.target.block_size
        cfg.max_io_bytes = spec["max_io"]
        cfg.depth = depth
        cfg.max_threads = min(depth, MAX_THREADS)
        cfg.shm = self.stats.base
        cfg.no_records = 1 if spec.get("no_records") else 0
        cfg.backing_bytes = self.target.backing_bytes
        cfg.backing_in_memory = 1 if getattr(self.target, "in_memory", False) else 0
        if spec.get("powercut"):
            cfg.write_log_bytes = int(spec["powercut"])
            cfg.write_log_fd = self.target.write_log_fd()
        if spec.get("log_writes"):
            from ..crash.logdevice import DeviceLog

            self.logw = DeviceLog(spec["log_writes"], self.target.block_size, self.stats.fault_area(), _log)
            self.logw.open(resume=False)
            cfg.logw = self.logw.lw
        err = ffi.new("char[256]")
        self.fuse = lib.us_fuse_start(cfg, self.mount.encode(), f"ublkshell-{self.name}".encode(),
                                      err, len(err))
        if self.fuse == ffi.NULL:
            raise UblkError(ffi.string(err).decode(errors="replace"))
        self.disk = fusedev.disk_path(self.dev_id)
        if spec.get("loop"):
            self.loopdev, self.loop_seq = fusedev.attach_loop(self.disk, self.target.block_size)
        entry = {
            "id": self.dev_id,
            "name": self.name,
            "transport": "fuse",
            **procs.me(),
            "target": spec["target"],
            "describe": self.target.describe(),
            "size": self.target.size,
            "block_size": self.target.block_size,
            "queues": 1,
            "depth": depth,
            "max_io": spec["max_io"],
            "flags": 0,
            "spec": spec,
            "log": os.environ.get("UBLKSHELL_DAEMON_LOG", ""),
            "stats": self.stats.path,
            "started": time.time(),
            "mount": self.mount,
            "file": self.disk,
            "loop": self.loopdev,
            "loop_seq": self.loop_seq,
            **self.target.state(),
        }
        registry.write(self.dev_id, entry)
        self.served = True
        _log(f"{self.name}: serving {self.target.describe()} as {self.disk}"
             + (f" ({self.loopdev})" if self.loopdev else ""))
        return entry

    def serve(self) -> int:
        """Wait for a stop signal, or for the mount to go away under us."""
        while not _stop:
            if _powercut:
                self.powercut()
            if self.logw:
                self.logw.poll()
            if lib.us_fuse_wait(self.fuse, 50 if self.logw else 200):
                _log(f"{self.name}: the FUSE session ended (unmounted or aborted from outside)")
                self.teardown(delete=False)
                return 1
        _log(f"{self.name}: signal {_stop[0]}, deleting")
        self.teardown(delete=True)
        return 0

    def powercut(self) -> None:
        """SIGUSR1 (faults/powercut.py): as bridge/daemon.py's, through the FUSE queue."""
        area = self.stats.fault_area()
        keep = int(area.powercut_keep) if area != ffi.NULL else 0
        n = lib.us_fuse_powercut(self.fuse, keep, int(area.seed) if area != ffi.NULL else 0, area)
        if self.logw:
            # what was made durable is logged; what was not dies with the power, as on the media
            self.logw.sync()
        if n < 0:
            _log(f"{self.name}: powercut: {os.strerror(-n)}")
        else:
            _log(f"{self.name}: powercut: {n} unflushed writes undone, "
                 f"{int(area.pc_kept)} kept; dying without a word")
        # like a machine losing power: no unmount, no loop detach; `del` cleans up
        os.kill(os.getpid(), signal.SIGKILL)

    def teardown(self, delete: bool) -> None:
        # the IO first: hung or delayed IO ends (EIO) so the loop device's detach cannot wait on it
        if self.fuse != ffi.NULL:
            lib.us_fuse_stop_io(self.fuse)
        # the loop device first: releasing it still goes through our (running) session
        if self.loopdev:
            try:
                fusedev.detach_loop(self.loopdev, self.disk, self.loop_seq)
            except UblkError as e:
                _log(str(e))
            self.loopdev = None
        if self.fuse != ffi.NULL:
            rc = lib.us_fuse_unmount(self.fuse)
            if rc == 1:
                _log(f"{self.name}: {self.mount} is busy: detached lazily, its users get errors from now on")
            elif rc < 0 and not lib.us_fuse_wait(self.fuse, 0):
                _log(f"{self.name}: unmounting {self.mount}: {os.strerror(-rc)}")
            if lib.us_fuse_wait(self.fuse, 2000):
                lib.us_fuse_free(self.fuse)
                self.fuse = ffi.NULL
            else:
                # exiting closes /dev/fuse, which aborts the connection and ends the workers
                _log(f"{self.name}: FUSE workers still held: leaving them to the process exit")
        if self.logw and self.fuse == ffi.NULL:
            # the workers are gone: nothing logs any more (else the process exit ends the log)
            self.logw.close(orderly=delete, served=self.served)
            self.logw = None
        self.target.close()
        if delete and self.dev_id >= 0:
            self.target.remove()
            fusedev.forget(self.dev_id)
            _log(f"{self.name}: deleted")


def _on_powercut(signum, frame):
    _powercut.append(signum)


def main(argv=None) -> int:
    from .daemon_main import daemon_main

    stop = {s: _on_signal for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    return daemon_main(argv, "ublkshell-fuse-daemon", FuseDaemon, {**stop, signal.SIGUSR1: _on_powercut})


if __name__ == "__main__":
    sys.exit(main())
