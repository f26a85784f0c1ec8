"""The targets, Python half: validate options, open the backing store, choose
device parameters. The IO itself is C (native/target_*.c), and the C table
(native/targets.c) is the list of targets: its entries say which options a
target takes and where its data lives (us_target_info).

The classes here are per kind of backing store, not per target: what Python
has to open (nothing, a mem file, the user's file). A new target with one of
those kinds needs nothing here (docs/design.md, "How to write the next target").
"""
import fcntl
import os
import stat
import struct

from . import ids as devids
from .paths import mem_path
from .. import files
from .._native import ffi, lib
from ..errors import UblkError, UsageError
from ..units import human, parse_size
from .recovery_modes import check_mode
from .io_modes import IO_MODES, ZERO_COPY_MODES
from .zoned import check_zoned, zone_geometry

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268


class Target:
    """A target whose data lives nowhere (null, pattern): only a size."""
    name = ""
    kind = -1   # index in the C table
    needs_size = True
    read_only = False
    help = ""

    def __init__(self, spec: dict):
        self.spec = spec
        self.fd = -1
        self.size = 0
        self.backing_bytes = 0
        self.block_size = spec.get("block_size", 512)

    # -- run in the CLI: reject bad input before any device exists --------
    @classmethod
    def validate(cls, spec: dict) -> None:
        if cls.needs_size and not spec.get("size"):
            raise UsageError(f"--size is required for the {cls.name} target (e.g. --size 1G)")
        if spec.get("file"):
            raise UsageError(f"-f/--file is only for the loop target, not {cls.name}")

    # -- run in the daemon ------------------------------------------------
    def open(self) -> None:
        """Open the backing store; called before ADD_DEV."""
        self.size = self.spec["size"]

    def attach(self, dev_id: int) -> None:
        """The device exists now (dev_id known)."""

    def describe(self) -> str:
        return self.name

    def state(self) -> dict:
        """What `list` and a recovering daemon need to know besides the spec."""
        return {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """The device was deleted: drop what only it used."""

    def write_log_fd(self) -> int:
        """powercut: a buffered fd on the data, to read what writes overwrite and put it back."""
        raise UsageError(f"--powercut needs a target that stores data (mem, loop), not {self.name}")

    def zero_copy_pays(self) -> bool:
        """`--zero-copy auto`: does registering the request's pages beat the driver's copy here?"""
        return False

    def dev_flags(self, features: int) -> int:
        """UBLK_F_* the target itself needs at ADD_DEV (zoned mem), given what the kernel offers."""
        return 0

    def zone_cfg(self, cfg) -> None:
        """Fill the native config's zone fields (zoned mem only)."""

    def fill_params(self, p, max_io_bytes: int, zero_copy: bool = False) -> None:
        shift = self.block_size.bit_length() - 1
        p.types = lib.UBLK_PARAM_TYPE_BASIC | lib.UBLK_PARAM_TYPE_DISCARD
        # a volatile cache + FUA so that FLUSH and FUA reach the target
        p.basic.attrs = lib.UBLK_ATTR_VOLATILE_CACHE | lib.UBLK_ATTR_FUA
        if self.read_only:
            p.basic.attrs |= lib.UBLK_ATTR_READ_ONLY
        p.basic.logical_bs_shift = shift
        p.basic.physical_bs_shift = max(shift, 12)
        p.basic.io_min_shift = shift
        p.basic.io_opt_shift = max(shift, 12)
        p.basic.max_sectors = max_io_bytes >> 9
        p.basic.dev_sectors = self.size >> 9
        p.discard.discard_granularity = max(self.block_size, 4096)
        p.discard.max_discard_sectors = 0xFFFFFFFF >> 9
        p.discard.max_write_zeroes_sectors = 0xFFFFFFFF >> 9
        p.discard.max_discard_segments = 1




class MemTarget(Target):
    """Data in a tmpfs file of the data dir that outlives the daemon (recovery); zoned, the
    zone state in a second file beside it (native/zones.c says why a file)."""

    def attach(self, dev_id: int) -> None:
        path = mem_path(dev_id)
        self.zone_fd = -1
        if self.spec.get("zoned"):
            self.zones_path = path + ".zones"
            # its length is native/zones.c's layout for this many zones
            nr = self.size // self.spec["zoned"]["zone_size"]
            self.zone_fd = self._open_store(dev_id, self.zones_path, int(lib.us_zones_file_size(nr)))
        self.fd = self._open_store(dev_id, path, self.size)
        # the file is the device's size: a zero-copy read through the ring never comes back short
        self.backing_bytes = self.size
        self.path = path

    def _open_store(self, dev_id: int, path: str, size: int) -> int:
        if self.spec.get("recover"):
            # the dead daemon's data: a missing file must not become an empty disk
            try:
                fd = files.open_nofollow(path, os.O_RDWR)
            except FileNotFoundError:
                raise UblkError(f"the mem data of device {devids.name(dev_id)} ({path}) "
                                "is gone: cannot recover it") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise UblkError(f"{path}: not a regular file: cannot recover from it")
            return fd
        # whatever an earlier device of this id left is replaced, never followed
        fd = files.create_new(path)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            raise UblkError(f"mem: cannot make {path} {size} bytes: {e.strerror}") from None
        return fd

    def describe(self) -> str:
        z = self.spec.get("zoned")
        if not z:
            return self.name
        conv = f", {z['conv_zones']} conventional" if z["conv_zones"] else ""
        return f"{self.name} zoned {human(z['zone_size'])} x {self.size // z['zone_size']}{conv}"

    def state(self) -> dict:
        out = {"mem_path": getattr(self, "path", None)}
        z = self.spec.get("zoned")
        if z:
            out["zones_path"] = getattr(self, "zones_path", None)
            out["zoned"] = zone_geometry(z, self.size)
        return out

    def write_log_fd(self) -> int:
        return self.fd

    def close(self) -> None:
        if getattr(self, "zone_fd", -1) >= 0:
            os.close(self.zone_fd)
            self.zone_fd = -1
        super().close()

    def remove(self) -> None:
        files.unlink_quiet(getattr(self, "path", None))
        files.unlink_quiet(getattr(self, "zones_path", None))

    def fill_params(self, p, max_io_bytes: int, zero_copy: bool = False) -> None:
        super().fill_params(p, max_io_bytes, zero_copy)
        z = self.spec.get("zoned")
        if not z:
            return
        # a host-managed drive: no discard or write-zeroes (their effect on a write pointer is
        # not what a zoned drive defines), zone size as chunk_sectors, the limits as given
        p.types = lib.UBLK_PARAM_TYPE_BASIC | lib.UBLK_PARAM_TYPE_ZONED
        p.basic.chunk_sectors = z["zone_size"] >> 9
        p.zoned.max_open_zones = z["max_open"]
        p.zoned.max_active_zones = z["max_active"]
        p.zoned.max_zone_append_sectors = min(max_io_bytes, z["zone_size"]) >> 9

    def dev_flags(self, features: int) -> int:
        """ADD_DEV flags the target needs: zoned wants UBLK_F_ZONED and user copy, which the
        driver insists on for it (its data crosses /dev/ublkcN, native/ublk_buffers.c)."""
        if not self.spec.get("zoned"):
            return 0
        missing = [n for n, b in (("UBLK_F_ZONED", lib.UBLK_F_ZONED), ("UBLK_F_USER_COPY", lib.UBLK_F_USER_COPY))
                   if not features & b]
        if missing:
            raise UblkError(f"--zoned: this kernel's ublk_drv does not offer {' and '.join(missing)} "
                            "(zoned ublk devices: Linux 6.6 and later, built with CONFIG_BLK_DEV_ZONED)")
        return lib.UBLK_F_ZONED | lib.UBLK_F_USER_COPY

    def zone_cfg(self, cfg) -> None:
        z = self.spec.get("zoned")
        if not z:
            return
        cfg.zone_sectors = z["zone_size"] >> 9
        cfg.zone_conv = z["conv_zones"]
        cfg.zone_max_open = z["max_open"]
        cfg.zone_max_active = z["max_active"]
        cfg.zone_fd = self.zone_fd


class LoopTarget(Target):
    """Data in the user's file or block device (-f)."""
    needs_size = False

    @classmethod
    def validate(cls, spec: dict) -> None:
        path = spec.get("file")
        if not path:
            raise UsageError(f"the {cls.name} target needs a backing file: -f/--file PATH")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UsageError(f"-f/--file: {path}: no such file") from None
        except OSError as e:
            raise UsageError(f"-f/--file: {path}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"-f/--file: {path}: not a regular file or block device")
        if stat.S_ISREG(st.st_mode) and st.st_size == 0 and not spec.get("size"):
            raise UsageError(f"-f/--file: {path} is empty: give --size to serve it anyway")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"-f/--file: {path}: needs read and write permission")

    def open(self) -> None:
        path = self.spec["file"]
        self.direct = False
        fd = -1
        # the FUSE transport copies through its own buffers at any byte offset: never O_DIRECT
        if not self.spec.get("buffered"):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
                align = lib.us_probe_direct(fd)
                if align and (align <= self.block_size or not self.spec.get("block_size_given")):
                    self.block_size = max(self.block_size, align)
                    self.direct = True
                else:
                    os.close(fd)
                    fd = -1
            except OSError:
                fd = -1
        if fd < 0:
            # tmpfs before 6.6, some FUSE and network filesystems: buffered IO
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.fd = fd
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            self.backing_bytes = struct.unpack("Q", buf)[0]
        else:
            self.backing_bytes = st.st_size
        size = self.spec.get("size") or self.backing_bytes
        self.size = size - size % self.block_size

        self.in_memory = bool(lib.us_fd_in_memory(fd))

    def describe(self) -> str:
        return f"{self.name} {self.spec['file']}"

    def zero_copy_pays(self) -> bool:
        # a file in RAM is copied in the queue thread; through io_uring its IO goes to worker
        # threads, which costs more than the copy at low depth (docs/benchmarks.md)
        return self.zero_copy and not self.in_memory

    def fill_params(self, p, max_io_bytes: int, zero_copy: bool = False) -> None:
        super().fill_params(p, max_io_bytes, zero_copy)
        if zero_copy and self.direct:
            # the client's own pages go to an O_DIRECT store: ask for the alignment it needs
            # (the driver's default is 4 bytes); a store that still refuses gets the copy path
            p.types |= lib.UBLK_PARAM_TYPE_DMA_ALIGN
            p.dma.alignment = max(self.block_size, 512) - 1

    def write_log_fd(self) -> int:
        # the IO fd may be O_DIRECT, whose alignment rules the log's reads need not follow
        self.log_fd = os.open(self.spec["file"], os.O_RDWR | os.O_CLOEXEC)
        return self.log_fd

    def close(self) -> None:
        if getattr(self, "log_fd", -1) >= 0:
            os.close(self.log_fd)
            self.log_fd = -1
        super().close()

    def state(self) -> dict:
        st = os.fstat(self.fd)
        # which file this is, so that `resize` grows this one and not what the path names later
        return {"direct_io": self.direct, "in_memory": self.in_memory, "file_id": [st.st_dev, st.st_ino]}


_BACKING = {lib.US_BACKING_NONE: Target, lib.US_BACKING_MEM: MemTarget, lib.US_BACKING_FILE: LoopTarget}


def _from_table() -> dict:
    """{name: class} for every target in the C table, each a subclass of its backing's class."""
    out, i = {}, 0
    while (info := lib.us_target_info(i)) != ffi.NULL:
        name = ffi.string(info.name).decode()
        base = _BACKING.get(info.backing)
        if base is None:
            raise RuntimeError(f"target {name}: backing {info.backing} has no Python side")
        out[name] = type(f"{name.title()}Target", (base,), {
            "name": name, "kind": i, "help": ffi.string(info.help).decode() if info.help else "",
            "needs_size": bool(info.options & lib.US_OPT_SIZE),
            "zoned_ok": bool(info.options & lib.US_OPT_ZONED),
            "read_only": bool(info.flags & lib.US_TGT_F_READ_ONLY),
            "zero_copy": bool(info.flags & lib.US_TGT_F_ZERO_COPY),
            "stores_data": info.backing != lib.US_BACKING_NONE})
        i += 1
    return out


TARGETS = _from_table()


POWERCUT_LOG = 256 << 20
# 1 EiB: sector numbers and byte offsets stay far from 64-bit overflow everywhere
MAX_DEVICE_SIZE = 1 << 60
TRANSPORTS = ("ublk", "fuse")


def build_spec(target: str, file=None, size=None, queues=1, depth=128, block_size=None,
               max_io="512k", dev_id=-1, transport="ublk", loop=False, powercut=False,
               no_records=False, recovery=None, io_mode="auto", coalesce_ns=0,
               zero_copy="auto", zoned=False, zone_size=None, conv_zones=None, max_open=None,
               max_active=None) -> dict:
    """Check the options of `add` and turn them into the daemon's spec."""
    if target not in TARGETS:
        raise UsageError(f"-t/--type: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    transport = transport or "ublk"
    if transport not in TRANSPORTS:
        raise UsageError(f"--transport: unknown transport {transport!r} (choose from {', '.join(TRANSPORTS)})")
    if loop and transport != "fuse":
        raise UsageError("--loop is only for --transport fuse (a ublk device is a block device already)")
    if transport == "fuse" and queues != 1:
        raise UsageError(f"-q/--queues: the FUSE transport has one queue, not {queues} "
                         "(its worker threads share it)")
    spec = {"target": target, "dev_id": dev_id}
    if transport == "fuse":
        spec.update(transport="fuse", loop=bool(loop), buffered=True)
    if file is not None:
        spec["file"] = os.path.abspath(file)
    if size is not None:
        spec["size"] = parse_size(size, "--size", hi=MAX_DEVICE_SIZE)
    # queues, depth and dev_id arrive range-checked (validate.py, verbs.ADD_ARGS)
    spec["queues"], spec["depth"] = queues, depth
    bs = 512 if block_size is None else parse_size(block_size, "--block-size")
    if bs not in (512, 1024, 2048, 4096):
        raise UsageError(f"--block-size: {block_size} must be 512, 1k, 2k or 4k")
    spec["block_size"], spec["block_size_given"] = bs, block_size is not None
    mio = parse_size(max_io, "--max-io")
    if mio % 4096 or not 4096 <= mio <= (32 << 20):
        raise UsageError(f"--max-io: {max_io} must be a multiple of 4k between 4k and 32M")
    spec["max_io"] = mio
    if "size" in spec and spec["size"] % bs:
        raise UsageError(f"--size: {size} is not a multiple of the block size ({bs})")
    if no_records:
        spec["no_records"] = True
    if powercut:
        if not TARGETS[target].stores_data:
            keep = ", ".join(n for n, t in TARGETS.items() if t.stores_data)
            raise UsageError(f"--powercut needs a target that stores data ({keep}), not {target}")
        spec["powercut"] = POWERCUT_LOG
    TARGETS[target].validate(spec)

    mode = check_mode(recovery)
    if mode and transport == "fuse":
        raise UsageError("--recovery is ublk's: its kernel driver holds IO while no daemon serves; a FUSE "
                         "connection ends with its daemon, so there is nothing to recover")
    if mode:
        spec["recovery"] = mode
    if io_mode not in IO_MODES:
        raise UsageError(f"--io-mode: unknown mode {io_mode!r} (choose from {', '.join(IO_MODES)})")
    if transport == "fuse" and io_mode != "auto":
        raise UsageError(f"--io-mode {io_mode} is ublk's; the FUSE transport has its own protocol")
    if transport != "fuse":
        spec["io_mode"] = io_mode
    if coalesce_ns and transport == "fuse":
        raise UsageError("--coalesce is for ublk queues; the FUSE transport's queue answers as it goes")
    if coalesce_ns % 1000:
        raise UsageError(f"--coalesce: {coalesce_ns}ns is not a whole number of microseconds")
    if coalesce_ns:
        spec["coalesce_us"] = coalesce_ns // 1000
    check_zero_copy(zero_copy, target, transport)
    if transport != "fuse":
        spec["zero_copy"] = zero_copy
    z = check_zoned(spec, TARGETS, zoned, zone_size, conv_zones, max_open, max_active)
    if z:
        spec["zoned"] = z
    return spec


def check_zero_copy(mode: str, target: str, transport: str) -> None:
    """`--zero-copy`: what the kernel offers is known only in the daemon (io_modes.zero_copy_flags)."""
    if mode not in ZERO_COPY_MODES:
        raise UsageError(f"--zero-copy: unknown mode {mode!r} (choose from {', '.join(ZERO_COPY_MODES)})")
    if mode in ("auto", "off"):
        return
    if transport == "fuse":
        raise UsageError(f"--zero-copy {mode} is ublk's (the request's pages registered with io_uring); "
                         "the FUSE transport copies")
    if not TARGETS[target].zero_copy:
        keep = ", ".join(n for n, t in TARGETS.items() if t.zero_copy)
        raise UsageError(f"--zero-copy {mode}: the {target} target makes its data in the daemon; "
                         f"zero copy is for targets that move it ({keep})")


def make_target(spec: dict) -> Target:
    return TARGETS[spec["target"]](spec)
