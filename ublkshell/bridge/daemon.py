"""The per-device IO daemon: the process the kernel sees as the ublk server.

`python -m ublkshell.bridge.daemon --spec JSON --ready-fd N` adds the device,
starts one native queue thread per hardware queue, STARTs the device, writes
its registry entry and tells the spawner (one JSON line on the ready fd).
Then it only waits: the IO never enters Python.

With `"recover": true` in its spec it takes over an existing device whose
daemon died instead (START_USER_RECOVERY, the same backing store and
statistics, END_USER_RECOVERY); everything else is the same path.

SIGTERM means "delete the device": STOP_DEV (the queues drain and see the
abort), close /dev/ublkcN, DEL_DEV. SIGKILL is what `kill` uses: the
kernel's abort path then runs for real.
"""
import errno
import os
import signal
import sys
import time

from .. import procs
from .._native import ffi, lib
from ..kernel.ctrl import Control, CtrlError
from ..errors import UblkError
from ..devices.paths import forget
from ..devices.io_modes import io_mode_flags, io_mode_of, zero_copy_flags, zero_copy_of
from ..devices.recovery_modes import recovery_flags, recovery_mode
from ..devices.targets import make_target
from ..devices import ids as devids, registry, unprivileged
from ..observe import shm
from .daemon_main import daemon_main, log as _log

# how long a recovering daemon waits for the kernel to let go of the dead one
RECOVERY_WAIT = float(os.environ.get("UBLKSHELL_RECOVERY_WAIT", "15"))
# After END_USER_RECOVERY, the block layer's requeue list is kicked again at these times (s).
# Measured on 7.3.4 (tests/vm/test_upgrade.py, 50 upgrades under fio): about once in 40
# hand-overs a request requeued while the device was quiesced stayed on the requeue list after
# the kernel's own kick, and its IO waited forever. blk-mq's debugfs `kick` runs that list.
REQUEUE_KICKS = (0.2, 1.0, 3.0)

_stop = []
_powercut = []


def _on_signal(signum, frame):
    _stop.append(signum)


def _on_powercut(signum, frame):
    _powercut.append(signum)


def _open_cdev(dev_id: int) -> int:
    path = f"/dev/ublkc{dev_id}"
    deadline = time.monotonic() + 5
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # udev (when there is one) may still be creating the node
            if time.monotonic() > deadline:
                raise UblkError(f"{path} did not appear after ADD_DEV") from None
            time.sleep(0.05)


def _affinity(ctrl: Control, dev_id: int, nr_queues: int) -> list[int]:
    cpus = []
    for q in range(nr_queues):
        try:
            allowed = ctrl.get_queue_affinity(dev_id, q)
        except CtrlError:
            allowed = []
        cpus.append(allowed[0] if allowed else -1)
    return cpus


class Daemon:
    def __init__(self, spec: dict):
        self.spec = spec
        self.target = make_target(spec)
        self.ctrl = None
        self.dev_id = -1
        self.cdev = -1
        self.dev = ffi.NULL
        self.stats = None
        self.abandoned = 0  # tags a dead daemon was serving (recovery only)
        self.logw = None    # --log-writes (crash/logdevice.py)
        self.served = False

    @property
    def recovering(self) -> bool:
        return bool(self.spec.get("recover"))

    def start(self) -> dict:
        """Make the device ours (a new one, or a recovered one), serve it, record it."""
        self.ctrl = Control()
        info = self._take_over() if self.recovering else self._create()
        self.dev_id = info.dev_id
        self.info = info
        if self.cdev < 0:
            self.cdev = _open_cdev(self.dev_id)
        self._open_stats(info)
        self._start_queues(info)
        # both return once every queue has FETCHed every tag
        if self.recovering:
            self.ctrl.end_user_recovery(self.dev_id, os.getpid())
        else:
            self.ctrl.start_dev(self.dev_id, os.getpid())
        if info.flags & lib.UBLK_F_UNPRIVILEGED_DEV and not self.recovering:
            unprivileged.wait_for_disk(self.dev_id, _log)
        entry = self._entry(info)
        registry.write(self.dev_id, entry)
        self.served = True
        how = f"recovered (#{entry['recoveries']})" if self.recovering else "serving"
        _log(f"dev {self.dev_id}: {how} {self.target.describe()} "
             f"({entry['queues']} queues x {entry['depth']})")
        return entry

    def _create(self):
        """ADD_DEV and SET_PARAMS for a new device."""
        spec = self.spec
        self.target.open()
        flags = recovery_flags(spec.get("recovery"), self.ctrl.features)
        flags |= io_mode_flags(spec.get("io_mode", "auto"), self.ctrl.features, spec["depth"])
        flags |= self.target.dev_flags(self.ctrl.features)
        flags |= zero_copy_flags(spec.get("zero_copy", "auto"), self.ctrl.features,
                                 self.target.zero_copy_pays())
        if self.ctrl.ioctl_encode:
            flags |= lib.UBLK_F_CMD_IOCTL_ENCODE
        flags = unprivileged.add_flags(flags)
        info = self.ctrl.add_dev(spec.get("dev_id", -1), spec["queues"], spec["depth"],
                                 spec["max_io"], flags)
        self.dev_id = info.dev_id
        if info.flags & lib.UBLK_F_UNPRIVILEGED_DEV:
            # every later command names /dev/ublkcN, which is root's until udev hands it over
            self.cdev = unprivileged.open_cdev(self.dev_id)
        self.target.attach(self.dev_id)
        params = ffi.new("struct ublk_params *")
        self.target.fill_params(params, info.max_io_buf_bytes, zero_copy_of(int(info.flags)))
        self.ctrl.set_params(self.dev_id, params)
        return info

    def _take_over(self):
        """START_USER_RECOVERY on a device whose daemon died; the kernel keeps
        its geometry and parameters, the backing store is reopened."""
        dev_id = int(self.spec["dev_id"])
        try:
            info = self.ctrl.get_dev_info(dev_id)
        except CtrlError as e:
            if e.errno == errno.ENODEV:
                raise UblkError(f"device {dev_id} does not exist") from None
            raise
        if not info.flags & lib.UBLK_F_USER_RECOVERY:
            raise UblkError(f"device {dev_id} was added without --recovery: it cannot be recovered")
        # the size and block size are the kernel's: a loop file that changed since must not change them
        params = self.ctrl.get_params(dev_id)
        self.spec["size"] = int(params.basic.dev_sectors) << 9
        self.spec["block_size"] = 1 << params.basic.logical_bs_shift
        self.spec["block_size_given"] = True
        self.target.block_size = self.spec["block_size"]
        # the backing store first: a recovery that cannot serve should not start
        self.target.open()
        self.target.attach(dev_id)
        deadline = time.monotonic() + RECOVERY_WAIT
        while True:
            try:
                self.ctrl.start_user_recovery(dev_id)
                break
            except CtrlError as e:
                if e.errno != errno.EBUSY:
                    raise
                # EBUSY: the dead daemon's /dev/ublkcN is not released yet
                # (its rings are torn down in the background), or a live daemon serves it
                info = self.ctrl.get_dev_info(dev_id)
                if info.state == lib.UBLK_S_DEV_LIVE and procs.alive(int(info.ublksrv_pid)):
                    raise UblkError(f"device {dev_id} is served by a live daemon "
                                    f"(pid {info.ublksrv_pid}): nothing to recover") from None
                if info.state == lib.UBLK_S_DEV_DEAD:
                    raise UblkError(f"device {dev_id} is stopped (DEAD): it cannot be recovered, "
                                    f"only deleted") from None
                if time.monotonic() > deadline:
                    raise UblkError(f"START_USER_RECOVERY on device {dev_id} still busy after "
                                    f"{RECOVERY_WAIT:.0f} s") from None
                time.sleep(0.05)
        self.dev_id = dev_id
        return self.ctrl.get_dev_info(dev_id)

    def _open_stats(self, info) -> None:
        nq, depth = int(info.nr_hw_queues), int(info.queue_depth)
        self.stats = None
        if self.recovering:
            # the same file, same layout: counters, histograms and the trace continue
            self.stats, self.abandoned = shm.adopt(self.dev_id, nq, depth, os.getpid())
        if self.stats is None:
            self.stats = shm.create(self.dev_id, nq, depth,
                                    self.spec.get("records", shm.DEFAULT_RECORDS), os.getpid())

    def _start_queues(self, info) -> None:
        spec = self.spec
        cfg = ffi.new("struct us_dev_cfg *")
        cfg.dev_id = self.dev_id
        cfg.nr_queues = info.nr_hw_queues
        cfg.depth = info.queue_depth
        cfg.max_io_bytes = info.max_io_buf_bytes
        cfg.dev_flags = info.flags
        cfg.ioctl_encode = 1 if self.ctrl.ioctl_encode else 0
        cfg.cdev_fd = self.cdev
        cfg.target = self.target.kind
        cfg.backing_fd = self.target.fd
        cfg.dev_bytes = self.target.size
        cfg.backing_bytes = self.target.backing_bytes
        cfg.backing_in_memory = 1 if getattr(self.target, "in_memory", False) else 0
        cfg.shm = self.stats.base
        cfg.no_records = 1 if spec.get("no_records") else 0
        cfg.coalesce_us = int(spec.get("coalesce_us", 0))
        cfg.zc_fallback = 1 if spec.get("zero_copy") == "fallback" else 0
        self.target.zone_cfg(cfg)
        if info.flags & lib.UBLK_F_AUTO_BUF_REG and not info.flags & lib.UBLK_F_USER_COPY:
            raise UblkError(f"device {self.dev_id} was added with zero copy (UBLK_F_AUTO_BUF_REG) but "
                            "without user copy (UBLK_F_USER_COPY), which ublkshell's copy path needs")
        if spec.get("powercut"):
            cfg.write_log_bytes = int(spec["powercut"])
            cfg.write_log_fd = self.target.write_log_fd()
        for q, cpu in enumerate(_affinity(self.ctrl, self.dev_id, info.nr_hw_queues)[:64]):
            cfg.cpus[q] = cpu
        if spec.get("log_writes"):
            from ..crash.logdevice import DeviceLog

            self.logw = DeviceLog(spec["log_writes"], self.target.block_size,
                                  lib.us_fault_area_of(self.stats.base), _log)
            self.logw.open(resume=self.recovering)
            cfg.logw = self.logw.lw
        err = ffi.new("int *")
        self.dev = lib.us_dev_start(cfg, err)
        if self.dev == ffi.NULL:
            raise UblkError(f"starting the queues failed: {os.strerror(-err[0])}")

    def _entry(self, info) -> dict:
        spec = {k: v for k, v in self.spec.items() if k not in ("recover", "recoveries")}
        spec["dev_id"] = self.dev_id
        return {
            "id": self.dev_id,
            "name": devids.name(self.dev_id),
            "transport": "ublk",
            **procs.me(),
            "target": spec["target"],
            "describe": self.target.describe(),
            "size": self.target.size,
            "block_size": self.target.block_size,
            "queues": int(info.nr_hw_queues),
            "depth": int(info.queue_depth),
            "max_io": int(info.max_io_buf_bytes),
            "flags": int(info.flags),
            "recovery": recovery_mode(int(info.flags)),
            "io_mode": io_mode_of(int(info.flags)),
            "zero_copy": zero_copy_of(int(info.flags)),
            "recoveries": int(self.spec.get("recoveries", 0)),
            "abandoned": self.abandoned,
            "spec": spec,
            "log": os.environ.get("UBLKSHELL_DAEMON_LOG", ""),
            "stats": self.stats.path,
            "started": time.time(),
            **self.target.state(),
        }

    def serve(self) -> int:
        """Wait until the queues end; on a stop signal, delete the device."""
        stop_sent_at = None
        started = time.monotonic()
        kicks = list(REQUEUE_KICKS) if self.recovering else []
        # a mark waits for this loop: look more often while there is a log
        wait_ms = 50 if self.logw else 200
        while not lib.us_dev_wait(self.dev, wait_ms):
            if self.logw:
                self.logw.poll()
            if kicks and time.monotonic() - started >= kicks[0]:
                kicks.pop(0)
                _kick_requeue(self.dev_id)
            if _powercut and not _stop:
                self.powercut()
            if _stop and stop_sent_at is None:
                _log(f"dev {self.dev_id}: signal {_stop[0]}, stopping")
                stop_sent_at = time.monotonic()
                self._drop_faults()
                try:
                    self.ctrl.stop_dev(self.dev_id)
                except CtrlError as e:
                    _log(str(e))
                    lib.us_dev_abort(self.dev)
            elif stop_sent_at is not None and time.monotonic() - stop_sent_at > 10:
                _log(f"dev {self.dev_id}: queues still busy 10 s after STOP_DEV, leaving them")
                lib.us_dev_abort(self.dev)
                stop_sent_at = float("inf")
        rc = 0
        for q in range(self.info.nr_hw_queues):
            e = lib.us_dev_queue_error(self.dev, q)
            if e:
                _log(f"dev {self.dev_id}: queue {q} ended with {os.strerror(-e)}")
                rc = 1
        self.teardown(delete=bool(_stop))
        return rc

    def powercut(self) -> None:
        """Stop serving at once, forget the unflushed writes, die like a killed daemon."""
        area = lib.us_fault_area_of(self.stats.base)
        keep = int(area.powercut_keep) if area != ffi.NULL else 0
        lib.us_dev_abort(self.dev)
        if not lib.us_dev_wait(self.dev, 10000):
            _log(f"dev {self.dev_id}: powercut: queues did not stop in 10 s")
        if self.logw:
            # what was made durable is logged; what was not dies with the power, as on the media
            self.logw.sync()
        n = lib.us_dev_powercut(self.dev, keep, int(area.seed) if area != ffi.NULL else 0, area)
        if n < 0:
            _log(f"dev {self.dev_id}: powercut: {os.strerror(-n)}")
        else:
            _log(f"dev {self.dev_id}: powercut: {n} unflushed writes undone, "
                 f"{int(area.pc_kept)} kept; the daemon dies now")
        # no STOP_DEV, no DEL_DEV: the kernel finds its server gone, as after a crash
        os.kill(os.getpid(), signal.SIGKILL)

    def _drop_faults(self) -> None:
        """STOP_DEV waits for every request: withheld (hang) and delayed IO must go on."""
        from ..faults import table

        try:
            if table.clear(self.dev_id):
                _log(f"dev {self.dev_id}: fault rules cleared for the stop")
        except UblkError as e:
            _log(str(e))

    def teardown(self, delete: bool) -> None:
        if self.dev != ffi.NULL:
            lib.us_dev_free(self.dev)
            self.dev = ffi.NULL
        if self.logw:
            # no queue is left to log: writes still held go in (an end mark if the device goes)
            self.logw.close(orderly=delete, served=self.served or self.recovering)
            self.logw = None
        if self.cdev >= 0:
            os.close(self.cdev)
            self.cdev = -1
        self.target.close()
        if delete and self.dev_id >= 0 and self.ctrl is not None:
            try:
                self.ctrl.stop_and_delete(self.dev_id)
            except CtrlError as e:
                _log(str(e))
            # the registry may not name the mem file yet (a failed start): the target knows it
            self.target.remove()
            forget(self.dev_id)
            _log(f"dev {self.dev_id}: deleted")


def _kick_requeue(dev_id: int) -> None:
    """Run the device's requeue list if requests wait on it (blk-mq debugfs; where debugfs is
    not mounted, nothing)."""
    base = f"/sys/kernel/debug/block/ublkb{dev_id}"
    try:
        with open(f"{base}/requeue_list", "rb") as f:
            waiting = f.read().count(b"\n")
        if not waiting:
            return
        fd = os.open(f"{base}/state", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"kick")
        _log(f"dev {dev_id}: {waiting} requests were left on the requeue list after the recovery: kicked")
    except OSError as e:
        _log(f"dev {dev_id}: kicking the requeue list: {e.strerror}")
    finally:
        os.close(fd)


def main(argv=None) -> int:
    stop = {s: _on_signal for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    # a failed recovery leaves the device waiting for the next attempt
    return daemon_main(argv, "ublkshell-daemon", Daemon, {**stop, signal.SIGUSR1: _on_powercut},
                       on_failure=lambda d: d.teardown(delete=not d.recovering))


if __name__ == "__main__":
    sys.exit(main())
