"""The IO daemon's half of `add --log-writes FILE`: open the log, hand it to the native
pipeline (native/logwrites.c writes it), publish its status in the device's shared memory,
take `mark` requests from there, and close it when the device goes.

Both daemons (bridge/daemon.py for ublk, bridge/fuse_daemon.py for FUSE) use this class the
same way: open() before the queues start, poll() from their wait loop, close() after the
queues have gone."""
from __future__ import annotations

import errno
import os
import stat

from .._native import ffi, lib
from ..errors import UblkError, UsageError
from ..units import parse_size
from . import logwrites

END_MARK = b"ublkshell-end"
# an orderly hand-over (upgrade, quiesce): every completed write is in the log, a successor goes on
HANDOVER_MARK = b"ublkshell-handover"
# a daemon that died: what it held (never flushed, or not yet written) is lost, so the log ends
RESTART_MARK = b"ublkshell-daemon-restart"
DEFAULT_MEMORY = 256 << 20
MARK_WAIT_MS = 10_000
CLOSE_WAIT_MS = 8_000   # below `del`'s patience, so the daemon ends on its own
# what a mark's name may hold: one sector of 512 bytes less the entry header, and a NUL
MAX_MARK = 512 - logwrites.ENTRY.size - 1
# why a log stopped, beyond what strerror says (reason())
ESTALE, EBADMSG = errno.ESTALE, errno.EBADMSG


class DeviceLog:
    def __init__(self, conf: dict, sectorsize: int, area, log):
        self.path = conf["path"]
        self.memory = int(conf.get("memory", DEFAULT_MEMORY))
        self.sectorsize = sectorsize
        self.area = area            # struct us_fault_area * (ffi.NULL: no shared memory)
        self.log = log
        self.fd = -1
        self.lw = ffi.NULL
        self.created = False
        self.pending = None         # (mark_req, ticket) of the mark being written

    def open(self, resume: bool) -> None:
        """A new log (the file must not exist); for a recovered daemon, the same log: continued
        after an orderly hand-over, ended with a restart mark after a crash."""
        box = self.area.lw if self.area != ffi.NULL else None
        if box is not None:
            box.limit = self.memory
            # a request the last daemon never answered is void; its writer is told so
            box.mark_err = errno.ECANCELED
            box.mark_done = box.mark_req
            box.on = 1
        if resume and box is not None and box.error:
            self.log(f"--log-writes {self.path}: the log had stopped "
                     f"({reason(int(box.error), self.memory)}); it stays stopped")
            return
        entries = next_off = 0
        handed_over = False
        if resume:
            try:
                self.fd, entries, next_off, handed_over = self._adopt()
            except UblkError as e:
                # the device matters more than its log: it serves, the log says why it stopped
                self.log(f"{e}; the device serves without it")
                self._stopped(EBADMSG)
                return
        else:
            self.fd = self._create()
            self.created = True
        err = ffi.new("int *")
        self.lw = lib.us_lw_open(self.fd, self.sectorsize, entries, next_off, self.memory, err)
        if self.lw == ffi.NULL:
            self._discard()
            raise UblkError(f"--log-writes {self.path}: {os.strerror(-err[0])}")
        if resume and not handed_over:
            index = ffi.new("uint64_t *")
            lib.us_lw_mark(self.lw, RESTART_MARK, MARK_WAIT_MS, index)
            self.log(f"--log-writes {self.path}: the last daemon died holding writes the log never "
                     f"got; the log ends at entry {int(index[0])} ({RESTART_MARK.decode()})")
            lib.us_lw_close(self.lw, ffi.NULL, CLOSE_WAIT_MS)
            self.lw = ffi.NULL
            os.close(self.fd)
            self.fd = -1
            self._stopped(ESTALE)
            return
        self.poll()

    def _stopped(self, err: int) -> None:
        if self.area != ffi.NULL and not self.area.lw.error:
            self.area.lw.error = err

    def _create(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)
        except FileExistsError:
            raise UblkError(f"--log-writes {self.path}: exists; name a new file (a log is never "
                            "overwritten)") from None
        except OSError as e:
            raise UblkError(f"--log-writes {self.path}: {e.strerror}") from None

    def _adopt(self) -> tuple[int, int, int, bool]:
        """The log file again: (fd, entries, end, whether its last daemon handed it over)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            what = "is a symlink" if e.errno == errno.ELOOP else e.strerror
            raise UblkError(f"--log-writes {self.path}: cannot continue the log: {what}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UblkError(f"--log-writes {self.path}: not a regular file: cannot continue the log")
            # the open file itself: the path may have changed since
            with logwrites.Log(f"/proc/self/fd/{fd}") as old:
                if old.super.sectorsize != self.sectorsize:
                    raise UblkError(f"--log-writes {self.path}: its sector size is "
                                    f"{old.super.sectorsize}, the device's {self.sectorsize}")
                last = None
                for last in old:
                    pass
                handed_over = last is not None and last.mark == HANDOVER_MARK.decode()
                return fd, old.super.nr_entries, old.end_at, handed_over
        except logwrites.LogError as e:
            os.close(fd)
            raise UblkError(f"--log-writes: cannot continue the log: {e}".replace(f"/proc/self/fd/{fd}",
                                                                                  self.path)) from None
        except BaseException:
            os.close(fd)
            raise

    def poll(self) -> None:
        """Publish the status; take a mark request, and answer it once it is in the file. Never
        waits: the daemon's loop also handles signals and the kernel."""
        if self.lw == ffi.NULL or self.area == ffi.NULL:
            return
        box = self.area.lw
        req = int(box.mark_req)
        if req != int(box.mark_done):
            if self.pending is None or self.pending[0] != req:
                name = ffi.string(box.mark_name, lib.US_LW_MARK_MAX)
                ticket = ffi.new("uint64_t *")
                rc = lib.us_lw_mark_add(self.lw, name, ticket) if 0 < len(name) <= MAX_MARK else -errno.EINVAL
                if rc < 0:
                    self._answer(box, req, -rc, 0)
                    return
                self.pending = (req, int(ticket[0]))
            index = ffi.new("uint64_t *")
            state = lib.us_lw_mark_state(self.lw, self.pending[1], index)
            if state:
                self._answer(box, req, -state if state < 0 else 0, int(index[0]) if state > 0 else 0)
                return
        self._publish(box)

    def _answer(self, box, req: int, err: int, index: int) -> None:
        box.mark_err, box.mark_index = err, index
        self._publish(box)
        self.pending = None
        box.mark_done = req

    def _publish(self, box) -> None:
        st = ffi.new("struct us_lw_status *")
        lib.us_lw_status(self.lw, st)
        box.entries, box.log_bytes = st.entries, st.log_bytes
        box.held_bytes, box.held_max, box.marks = st.held_bytes, st.held_max, st.marks
        if st.error and not box.error:
            self.log(f"--log-writes {self.path}: logging stopped: {reason(st.error, self.memory)}")
        box.error = st.error

    def sync(self) -> None:
        """What is ready goes to the file (before the daemon dies on purpose: powercut)."""
        if self.lw != ffi.NULL:
            lib.us_lw_sync(self.lw, MARK_WAIT_MS)

    def close(self, orderly: bool, served: bool = True) -> None:
        """After the queues are gone. Held writes happened to the device: they are logged, then
        (orderly: the device is deleted) an end mark, as dm-log-writes does when its target goes,
        or a hand-over mark, so that the next daemon goes on with the log. A device that never
        served (its start failed) leaves no log it created behind, so the same add can be retried."""
        if not served:
            self._discard()
            return
        if self.lw == ffi.NULL:
            return
        if self.area != ffi.NULL:
            self.poll()
            self.area.lw.on = 0
        rc = lib.us_lw_close(self.lw, END_MARK if orderly else HANDOVER_MARK, CLOSE_WAIT_MS)
        self.lw = ffi.NULL
        if rc < 0:
            self.log(f"--log-writes {self.path}: {reason(-rc, self.memory)}")
        os.close(self.fd)
        self.fd = -1

    def _discard(self) -> None:
        if self.lw != ffi.NULL:
            if self.area != ffi.NULL:
                self.area.lw.on = 0
            lib.us_lw_close(self.lw, ffi.NULL, CLOSE_WAIT_MS)
            self.lw = ffi.NULL
        if self.fd < 0:
            return
        try:
            st, now = os.fstat(self.fd), os.lstat(self.path)
            # only the very file this daemon created, never what took its name since
            if self.created and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def check_spec(path, memory, zoned) -> dict | None:
    """`--log-writes FILE`: a new file in a directory that exists (the daemon creates it,
    O_EXCL and O_NOFOLLOW, so what is checked here cannot be swapped under it)."""
    if path is None:
        if memory is not None:
            raise UsageError("--log-writes-memory is for --log-writes FILE")
        return None
    if not path:
        raise UsageError("--log-writes: FILE is empty")
    if zoned:
        raise UsageError("--log-writes: a dm-log-writes log has no zone appends; it cannot be used "
                         "with --zoned")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UsageError(f"--log-writes {path}: {parent} is not a directory")
    if os.path.lexists(path):
        raise UsageError(f"--log-writes {path}: exists; name a new file (a log is never overwritten)")
    mem = DEFAULT_MEMORY if memory is None else parse_size(memory, "--log-writes-memory",
                                                           lo=1 << 20, hi=1 << 40)
    return {"path": path, "memory": mem}


def reason(err: int, memory: int) -> str:
    if err == errno.ENOBUFS:
        return (f"more than {memory >> 20} MiB of writes waited for a flush or for the log's disk "
                "(raise --log-writes-memory)")
    if err == ESTALE:
        return (f"its daemon died holding writes the log never got: the log ends at the "
                f"{RESTART_MARK.decode()} mark")
    if err == EBADMSG:
        return "a restarted daemon could not continue the log (its daemon log says why)"
    if err == errno.EINVAL:
        return "an IO smaller than the device's block size cannot be logged in its units"
    if err == errno.ETIMEDOUT:
        return "its writer could not finish in time when the daemon ended"
    return os.strerror(err)
