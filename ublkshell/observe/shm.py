"""A device's shared memory (native/records.h): created by its daemon, read by
everyone else. Counters, latency histograms, per-tag state and the IO record
rings, all in a file on tmpfs so a killed daemon's numbers stay readable."""
import errno
import mmap
import os
import stat

from ..devices import ids as devids
from ..devices.paths import stats_path
from .. import files
from .._native import ffi, lib
from ..errors import UblkError

DEFAULT_RECORDS = 16384


class Shm:
    """One mapping of a statistics file, checked before anything reads it.

    The file is input: whoever can write it decides every header field, and
    the C readers take the header's offsets as they are. So the mapping is
    exactly as long as the checked layout (never the file's st_size), and it
    exists only once us_shm_check has accepted it for that length.

    A file that shrank under its mapping would SIGBUS the reader; the daemon
    never does that: it publishes a fresh inode, sized before it is renamed
    into place (create), and afterwards only unlinks it (remove).
    """

    def __init__(self, path: str, writable: bool = False, _unpublished: bool = False,
                 keep_fd: bool = False):
        """keep_fd: keep the checked file open as self.fd (closed by close()), for an flock on
        the very inode that is mapped rather than on whatever a second open of path finds."""
        self.path = path
        self.map = self.buf = self.base = self.hdr = None
        self.fd = -1
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        flags = ((os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
                 | os.O_NONBLOCK)
        try:
            # opening a device node or a FIFO can itself do something: look before opening
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise UblkError(f"{path}: not ublkshell statistics (a symbolic link)")
            if not stat.S_ISREG(mode):
                raise UblkError(f"{path}: not ublkshell statistics (not a regular file)")
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise  # callers tell "no statistics yet" from a bad file
        except OSError as e:
            # the lstat above is only a courtesy: these are the races it cannot close
            if e.errno == errno.ELOOP:
                raise UblkError(f"{path}: not ublkshell statistics (a symbolic link)") from None
            if e.errno in (errno.EISDIR, errno.ENXIO):
                raise UblkError(f"{path}: not ublkshell statistics (not a regular file)") from None
            raise UblkError(f"{path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UblkError(f"{path}: not ublkshell statistics (not a regular file)")
            # the creator maps its own fresh, still unlaid-out file; everyone else maps
            # what a header read by pread says the layout needs, and no more
            size = st.st_size if _unpublished else self._checked_size(fd, st.st_size)
            if size == 0:
                raise UblkError(f"{path}: not ublkshell statistics (file size 0)")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(fd)
            raise
        if keep_fd:
            self.fd = fd
        else:
            os.close(fd)
        self.size = size
        self.buf = ffi.from_buffer("char[]", self.map, require_writable=writable)
        self.base = ffi.cast("void *", self.buf)
        self.hdr = ffi.cast("struct us_shm_hdr *", self.base)
        if not _unpublished:
            try:
                # again on the mapping itself: the header may have changed since the pread
                self.check()
            except UblkError:
                self.close()
                raise

    def _checked_size(self, fd: int, file_size: int) -> int:
        """The layout's size, from a private copy of the header checked against the file's size."""
        hdr_size = ffi.sizeof("struct us_shm_hdr")
        head = ffi.new("char[]", hdr_size)
        got = os.pread(fd, hdr_size, 0)
        ffi.memmove(head, got, len(got))
        # us_shm_check reads only the header when the length covers it, and the copy holds it
        self._raise_if_bad(head, file_size if len(got) == hdr_size else len(got))
        h = ffi.cast("struct us_shm_hdr *", head)
        return lib.us_shm_size(h.nr_queues, h.depth, h.rec_entries)

    def _raise_if_bad(self, base, length: int) -> None:
        bad = ffi.new("struct us_shm_bad *")
        if lib.us_shm_check(base, length, bad):
            raise UblkError(f"{self.path}: not ublkshell statistics ({ffi.string(bad.why).decode()})")

    def check(self) -> "Shm":
        """Refuse the mapping unless the C readers can trust it; fixes the geometry Python loops over."""
        if self.base is None:
            raise UblkError(f"{self.path}: statistics already closed")
        self._raise_if_bad(self.base, self.size)
        # Python iterates over these copies, never over fields someone may rewrite later
        self.nr_queues = int(self.hdr.nr_queues)
        self.depth = int(self.hdr.depth)
        self.rec_entries = int(self.hdr.rec_entries)
        return self

    def queue(self, q: int):
        sq = lib.us_shm_queue(self.base, q)
        if sq == ffi.NULL:
            # a NULL struct pointer dereferenced in Python is a segfault, not an exception
            raise UblkError(f"{self.path}: no queue {q} (the file has {self.nr_queues})")
        return sq

    def tags(self, q: int):
        """Queue q's per-tag states, self.depth of them."""
        self.queue(q)
        return lib.us_shm_tags(self.base, q)

    def op_stats(self, q: int, op: int):
        return self.queue(q).ops[op]

    def fault_area(self):
        """The fault rules' part of the file (native/faults.h), ffi.NULL if it has none."""
        return lib.us_fault_area_of(self.base)

    def close(self) -> None:
        self.buf = self.base = self.hdr = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.map is None:
            return
        try:
            self.map.close()
        except BufferError:
            pass  # a cdata view is still alive somewhere; the mapping goes with it


def create(dev_id: int, nr_queues: int, depth: int, records: int, pid: int) -> Shm:
    if records < lib.US_REC_MIN or records > lib.US_REC_MAX or records & (records - 1):
        raise UblkError(f"--records: {records} must be a power of two in {lib.US_REC_MIN}..{lib.US_REC_MAX}")
    size = lib.us_shm_size(nr_queues, depth, records)
    if not size:
        raise UblkError(f"statistics for {nr_queues} queues x {depth} tags: outside "
                        f"1..{lib.UBLK_MAX_NR_QUEUES} x 1..{lib.UBLK_MAX_QUEUE_DEPTH}")
    path = stats_path(dev_id, create=True)
    # a fresh inode every time (a private temporary file, renamed into place):
    # readers that still map an earlier device's file keep that file
    fd, tmp = files.make_temp(path)
    s = None
    try:
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        s = Shm(tmp, writable=True, _unpublished=True)
        rc = lib.us_shm_init(s.base, size, nr_queues, depth, records, dev_id, pid)
        if rc:
            raise UblkError(f"{path}: cannot lay out statistics: {os.strerror(-rc)}")
        # the daemon's own queue threads get this mapping: it passes the readers' check too
        s.check()
        # published whole and never truncated afterwards, so no reader's mapping outgrows the file
        os.replace(tmp, path)
    except BaseException:
        if s is not None:
            s.close()
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
        s = Shm(stats_path(dev_id), writable=True).check()
    except (OSError, UblkError):
        return None, 0
    if s.nr_queues != nr_queues or s.depth != depth:
        s.close()
        return None, 0
    # no queue thread runs yet: these words have no other writer now
    abandoned = 0
    for q in range(nr_queues):
        tags = s.tags(q)
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
    path = stats_path(dev_id)
    try:
        return Shm(path).check()
    except FileNotFoundError:
        raise UblkError(f"device {devids.name(dev_id)} has no statistics (not served by ublkshell?)") from None
