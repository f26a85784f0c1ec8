"""A device's shared memory (native/records.h): created by its daemon, read by
everyone else. Counters, latency histograms, per-tag state and the IO record
rings, all in a file on tmpfs so a killed daemon's numbers stay readable."""
import mmap
import os

from .. import devids, files
from .._native import ffi, lib
from ..errors import UblkError

DEFAULT_RECORDS = 16384
OPS = ("read", "write", "flush", "discard", "write_zeroes", "other")
OP_NAMES = {0: "read", 1: "write", 2: "flush", 3: "discard", 5: "write_zeroes"}


def path_for(dev_id: int, create: bool = False) -> str:
    """The device's statistics file, in the data dir (files.py); readers never create that dir."""
    # no data dir yet: a path that cannot exist, so readers say "no statistics"
    d = files.data_dir(create) or "/proc/self/.ublkshell-no-data-dir"
    return os.path.join(d, f"{devids.stem(dev_id)}.stats")


class Shm:
    def __init__(self, path: str, writable: bool = False):
        self.path = path
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < ffi.sizeof("struct us_shm_hdr"):
                raise UblkError(f"{path}: too small to hold device statistics")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.buf = ffi.from_buffer("char[]", self.map, require_writable=writable)
        self.base = ffi.cast("void *", self.buf)
        self.hdr = ffi.cast("struct us_shm_hdr *", self.base)

    def check(self) -> "Shm":
        if self.hdr.magic != lib.US_SHM_MAGIC or self.hdr.version != lib.US_SHM_VERSION:
            raise UblkError(f"{self.path}: not ublkshell statistics (or another version)")
        return self

    @property
    def nr_queues(self) -> int:
        return int(self.hdr.nr_queues)

    @property
    def depth(self) -> int:
        return int(self.hdr.depth)

    def queue(self, q: int):
        return lib.us_shm_queue(self.base, q)

    def op_stats(self, q: int, op: int):
        return self.queue(q).ops[op]

    def fault_area(self):
        """The fault rules' part of the file (native/faults.h), ffi.NULL if it has none."""
        return lib.us_fault_area_of(self.base)

    def close(self) -> None:
        self.buf = self.base = self.hdr = None
        try:
            self.map.close()
        except BufferError:
            pass  # a cdata view is still alive somewhere; the mapping goes with it


def create(dev_id: int, nr_queues: int, depth: int, records: int, pid: int) -> Shm:
    if records < 16 or records & (records - 1) or records > 1 << 24:
        raise UblkError(f"--records: {records} must be a power of two in 16..16M")
    path = path_for(dev_id, create=True)
    size = lib.us_shm_size(nr_queues, depth, records)
    # a fresh inode every time (a private temporary file, renamed into place):
    # readers that still map an earlier device's file keep that file
    fd, tmp = files.make_temp(path)
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        s = Shm(tmp, writable=True)
        rc = lib.us_shm_init(s.base, size, nr_queues, depth, records, dev_id, pid)
        if rc:
            raise UblkError(f"{path}: cannot lay out statistics: {os.strerror(-rc)}")
        os.replace(tmp, path)
    except BaseException:
        files.unlink_quiet(tmp)
        raise
    s.path = path
    return s


def adopt(dev_id: int, nr_queues: int, depth: int, pid: int):
    """A recovering daemon takes over its predecessor's file, so counters,
    histograms and trace cursors carry on. Returns (Shm or None, tags the
    dead daemon was serving); None when there is no usable file of this
    layout (the caller creates a fresh one)."""
    try:
        s = Shm(path_for(dev_id), writable=True).check()
    except (OSError, UblkError):
        return None, 0
    if s.nr_queues != nr_queues or s.depth != depth:
        s.close()
        return None, 0
    # no queue thread runs yet: these words have no other writer now
    abandoned = 0
    for q in range(nr_queues):
        tags = lib.us_shm_tags(s.base, q)
        for t in range(depth):
            if tags[t].state:
                abandoned += 1
                tags[t].state = 0
                tags[t].fault = 0
        s.queue(q).inflight = 0
    area = s.fault_area()
    if area != ffi.NULL:
        # the rules stay; the IO that hang rules withheld went with the dead daemon
        area.hung = 0
    s.hdr.daemon_pid = pid
    return s, abandoned


def open_device(dev_id: int) -> Shm:
    path = path_for(dev_id)
    try:
        return Shm(path).check()
    except FileNotFoundError:
        raise UblkError(f"device {devids.name(dev_id)} has no statistics (not served by ublkshell?)") from None


def remove(dev_id: int) -> None:
    files.unlink_quiet(path_for(dev_id))
