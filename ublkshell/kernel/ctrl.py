"""Control commands on /dev/ublk-control (ADD/SET_PARAMS/START/STOP/DEL, queries).

Each call is one io_uring URING_CMD issued by native/ctrl.c with the GIL
released, so a START_DEV that waits for the queues does not stall Python.
"""
import errno
import os

from .._native import ffi, lib
from ..errors import UblkError

CONTROL_PATH = "/dev/ublk-control"
NO_DRIVER_HINT = (
    "the running kernel has no ublk_drv ({path} is missing): load it with "
    "`modprobe ublk_drv`, run inside the bundled VM: `ublkshell vm -- ublkshell ...`, "
    "or serve the device through FUSE instead: `add --transport fuse`"
)
_QUEUE_NONE = 0xFFFF
_DEV_ANY = 0xFFFFFFFF
SECURITY_DOC = "docs/security.md, \"Unprivileged devices\""
NO_ACCESS_HINT = (
    "{path}: permission denied: ublk control needs root, or for a user who is not root "
    "read-write access to {path} (the admin's group and udev rule: " + SECURITY_DOC + ")"
)


def cdev_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"

# command -> (ioctl-encoded opcode, legacy opcode or None)
_OPS = {
    "GET_QUEUE_AFFINITY": (lib.UBLK_U_CMD_GET_QUEUE_AFFINITY, lib.UBLK_CMD_GET_QUEUE_AFFINITY),
    "GET_DEV_INFO": (lib.UBLK_U_CMD_GET_DEV_INFO, lib.UBLK_CMD_GET_DEV_INFO),
    "GET_DEV_INFO2": (lib.UBLK_U_CMD_GET_DEV_INFO2, lib.UBLK_CMD_GET_DEV_INFO2),
    "ADD_DEV": (lib.UBLK_U_CMD_ADD_DEV, lib.UBLK_CMD_ADD_DEV),
    "DEL_DEV": (lib.UBLK_U_CMD_DEL_DEV, lib.UBLK_CMD_DEL_DEV),
    "START_DEV": (lib.UBLK_U_CMD_START_DEV, lib.UBLK_CMD_START_DEV),
    "STOP_DEV": (lib.UBLK_U_CMD_STOP_DEV, lib.UBLK_CMD_STOP_DEV),
    "SET_PARAMS": (lib.UBLK_U_CMD_SET_PARAMS, lib.UBLK_CMD_SET_PARAMS),
    "GET_PARAMS": (lib.UBLK_U_CMD_GET_PARAMS, lib.UBLK_CMD_GET_PARAMS),
    "START_USER_RECOVERY": (lib.UBLK_U_CMD_START_USER_RECOVERY, lib.UBLK_CMD_START_USER_RECOVERY),
    "END_USER_RECOVERY": (lib.UBLK_U_CMD_END_USER_RECOVERY, lib.UBLK_CMD_END_USER_RECOVERY),
    "GET_FEATURES": (lib.UBLK_U_CMD_GET_FEATURES, None),
    "UPDATE_SIZE": (lib.UBLK_U_CMD_UPDATE_SIZE, None),
    "QUIESCE_DEV": (lib.UBLK_U_CMD_QUIESCE_DEV, None),
}


class CtrlError(UblkError):
    def __init__(self, command: str, dev_id, err: int):
        self.command, self.dev_id, self.errno = command, dev_id, err
        what = command if dev_id is None else f"{command} on device {dev_id}"
        why = f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"
        if err == errno.EPERM:
            why += (": ublk control needs root (CAP_SYS_ADMIN)" if os.geteuid() == 0 or dev_id is None
                    else ": the device is not yours (root's, or another user's)")
        elif err == errno.EACCES and dev_id is not None:
            why += f": {cdev_path(dev_id)} is not yours (another user's device, or udev has not handed it over)"
        super().__init__(f"{what} failed: {why}")


class Control:
    """An open /dev/ublk-control. Use as a context manager."""

    def __init__(self, path: str = CONTROL_PATH):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(NO_DRIVER_HINT.format(path=path)) from None
        except PermissionError:
            raise UblkError(NO_ACCESS_HINT.format(path=path)) from None
        except OSError as e:
            raise UblkError(f"{path}: {e.strerror}") from None
        self._features = None
        self.ioctl_encode = True
        # dev_id -> whether the device is UBLK_F_UNPRIVILEGED_DEV, whose every command
        # must carry /dev/ublkcN for the kernel's permission check (see _cmd)
        self._unpriv = {}
        try:
            self._features = self.get_features()
        except CtrlError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                raise
            self._features = 0
        # kernels that predate GET_FEATURES (< 6.4) only know the legacy numbers
        self.ioctl_encode = bool(self._features & lib.UBLK_F_CMD_IOCTL_ENCODE)

    @property
    def features(self) -> int:
        return self._features or 0

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _cmd(self, name, dev_id=_DEV_ANY, buf=None, data0=0, queue_id=_QUEUE_NONE, path=None):
        """One control command. path: the device's char node, for an unprivileged device
        (and GET_DEV_INFO2): the kernel reads dev_path_len bytes at addr as the path,
        checks the caller may open that node, then takes the rest of the buffer as the
        command's own data; so the data goes after the path and is copied back."""
        encoded, legacy = _OPS[name]
        op = encoded if (self.ioctl_encode or legacy is None) else legacy
        cmd = ffi.new("struct ublksrv_ctrl_cmd *")
        cmd.dev_id = dev_id
        cmd.queue_id = queue_id
        cmd.data[0] = data0
        size = 0
        if buf is not None:
            t = ffi.typeof(buf)
            size = ffi.sizeof(t.item) if t.kind == "pointer" else ffi.sizeof(buf)
        joined = None
        if path is not None:
            p = path.encode()
            joined = ffi.new("char[]", len(p) + size)
            ffi.memmove(joined, p, len(p))
            if size:
                ffi.memmove(joined + len(p), buf, size)
            cmd.addr = int(ffi.cast("uintptr_t", joined))
            cmd.len = len(p) + size
            cmd.dev_path_len = len(p)
        elif buf is not None:
            cmd.addr = int(ffi.cast("uintptr_t", buf))
            cmd.len = size
        res = lib.us_ctrl_cmd(self.fd, op, cmd)
        if res < 0:
            raise CtrlError(name, None if dev_id == _DEV_ANY else dev_id, -res)
        if joined is not None and size:
            ffi.memmove(buf, joined + len(path.encode()), size)
        return res

    def _path_for(self, dev_id: int):
        """The char node path a command on dev_id must carry, or None for a device that
        takes none (one added by root, or a kernel without unprivileged devices)."""
        if not self.features & lib.UBLK_F_UNPRIVILEGED_DEV:
            return None
        if dev_id not in self._unpriv:
            self.get_dev_info(dev_id)
        return cdev_path(dev_id) if self._unpriv.get(dev_id) else None

    def _dev_cmd(self, name, dev_id, **kw):
        try:
            return self._cmd(name, dev_id, path=self._path_for(dev_id), **kw)
        except CtrlError:
            # the id may name another device by now: ask again next time
            self._unpriv.pop(dev_id, None)
            raise

    # -- queries ---------------------------------------------------------
    def get_features(self) -> int:
        buf = ffi.new("uint64_t *")
        self._cmd("GET_FEATURES", buf=buf)
        return int(buf[0])

    def get_dev_info(self, dev_id: int):
        info = ffi.new("struct ublksrv_ctrl_dev_info *")
        try:
            # root's devices answer without a path, so a missing or odd /dev/ublkcN (a static
            # /dev, an rm) never hides one of them from root's list or del
            self._cmd("GET_DEV_INFO", dev_id, buf=info)
        except CtrlError as e:
            # EINVAL: an unprivileged device, which wants its path; EPERM: a user asking
            # about root's device (GET_DEV_INFO2 says so again, or serves the user's own)
            if not self.features & lib.UBLK_F_UNPRIVILEGED_DEV or e.errno not in (errno.EINVAL, errno.EPERM):
                raise
            try:
                self._cmd("GET_DEV_INFO2", dev_id, buf=info, path=cdev_path(dev_id))
            except CtrlError as e2:
                if e2.errno != errno.ENOENT:
                    raise
                if dev_id not in list_device_ids():
                    raise CtrlError("GET_DEV_INFO2", dev_id, errno.ENODEV) from None  # gone meanwhile
                raise UblkError(f"device {dev_id}: {cdev_path(dev_id)} is missing, and the kernel "
                                "takes commands on a device a user added only with it") from None
        self._unpriv[dev_id] = bool(info.flags & lib.UBLK_F_UNPRIVILEGED_DEV)
        return info

    def get_params(self, dev_id: int):
        params = ffi.new("struct ublk_params *")
        params.len = ffi.sizeof("struct ublk_params")
        self._dev_cmd("GET_PARAMS", dev_id, buf=params)
        return params

    def get_queue_affinity(self, dev_id: int, q_id: int) -> list[int]:
        # a cpu mask sized like glibc's cpu_set_t (1024 cpus)
        mask = ffi.new("uint64_t[16]")
        self._dev_cmd("GET_QUEUE_AFFINITY", dev_id, buf=mask, data0=q_id)
        return [w * 64 + b for w in range(16) for b in range(64) if mask[w] >> b & 1]

    # -- lifecycle -------------------------------------------------------
    def add_dev(self, dev_id: int, nr_queues: int, depth: int, max_io_bytes: int, flags: int):
        info = ffi.new("struct ublksrv_ctrl_dev_info *")
        info.nr_hw_queues = nr_queues
        info.queue_depth = depth
        info.max_io_buf_bytes = max_io_bytes
        info.dev_id = _DEV_ANY if dev_id < 0 else dev_id
        info.ublksrv_pid = -1
        info.flags = flags
        self._cmd("ADD_DEV", info.dev_id, buf=info)
        self._unpriv[int(info.dev_id)] = bool(info.flags & lib.UBLK_F_UNPRIVILEGED_DEV)
        return info

    def set_params(self, dev_id: int, params):
        params.len = ffi.sizeof("struct ublk_params")
        self._dev_cmd("SET_PARAMS", dev_id, buf=params)

    def start_dev(self, dev_id: int, pid: int):
        self._dev_cmd("START_DEV", dev_id, data0=pid)

    def stop_dev(self, dev_id: int):
        self._dev_cmd("STOP_DEV", dev_id)

    def del_dev(self, dev_id: int):
        self._dev_cmd("DEL_DEV", dev_id)

    def stop_and_delete(self, dev_id: int) -> None:
        """STOP_DEV (harmless if already stopped) then DEL_DEV; a device already gone is fine."""
        try:
            self.stop_dev(dev_id)
        except CtrlError:
            pass
        try:
            self.del_dev(dev_id)
        except CtrlError as e:
            if e.errno != errno.ENODEV:
                raise

    def update_size(self, dev_id: int, sectors: int):
        self._dev_cmd("UPDATE_SIZE", dev_id, data0=sectors)

    def quiesce_dev(self, dev_id: int, timeout_ms: int):
        # 0 would be "wait forever" to the kernel: never ours
        self._dev_cmd("QUIESCE_DEV", dev_id, data0=max(1, timeout_ms))

    def start_user_recovery(self, dev_id: int):
        self._dev_cmd("START_USER_RECOVERY", dev_id)

    def end_user_recovery(self, dev_id: int, pid: int):
        self._dev_cmd("END_USER_RECOVERY", dev_id, data0=pid)


def list_device_ids() -> list[int]:
    """Ids of the ublk devices the kernel has now (from their char devices)."""
    ids = []
    for root in ("/sys/class/ublk-char", "/dev"):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for n in names:
            if n.startswith("ublkc") and n[5:].isdigit():
                ids.append(int(n[5:]))
        if ids:
            break
    return sorted(set(ids))
