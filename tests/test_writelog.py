"""powercut's write log on the host, without a device: writes and flushes go
through the same begin/end calls the ring loop makes, then the power is cut
and the file shows what survived (native/writelog.c)."""
import errno
import os
import shutil
import tempfile

import pytest

from ublkshell._native import ffi, lib

S = 512
WRITE, FLUSH = lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH
FUA = lib.UBLK_IO_F_FUA


class Disk:
    """A backing file, its write log, and a way to play IO against both."""

    def __init__(self, path, sectors=64, log_flags=os.O_RDWR):
        self.path = path
        with open(path, "wb") as f:
            f.write(b"A" * sectors * S)
        self.rw = os.open(path, os.O_RDWR)
        self.log_fd = os.open(path, log_flags)
        self.w = lib.us_wlog_new(self.log_fd, 1 << 20)
        assert self.w != ffi.NULL
        self.report = ffi.new("struct us_fault_area *")

    def begin(self, op, sector=0, sectors=0, data=None):
        h = lib.us_wlog_test_begin(self.w, op, sector, sectors)
        assert h != ffi.NULL
        if data is not None:  # the target writes after the log kept the old data
            os.pwrite(self.rw, data * sectors * S, sector * S)
        return h

    def end(self, h):
        lib.us_wlog_test_end(self.w, h, 1)

    def write(self, sector, sectors, data, flags=0):
        self.end(self.begin(WRITE | flags, sector, sectors, data))

    def flush(self):
        self.end(self.begin(FLUSH))

    def cut(self, keep=0.0, seed=0):
        return lib.us_wlog_powercut(self.w, int(keep * 1_000_000), seed, self.report)

    def sectors(self, first, n):
        data = os.pread(self.rw, n * S, first * S)
        return [data[i * S:i * S + 1] for i in range(n)]

    def close(self):
        lib.us_wlog_free(self.w)
        os.close(self.rw)
        os.close(self.log_fd)


@pytest.fixture
def disk(tmp_path):
    d = Disk(str(tmp_path / "disk"))
    yield d
    d.close()


def test_unflushed_writes_are_undone_and_durable_ones_kept(disk):
    disk.write(0, 8, b"B")
    disk.flush()                                    # 0..7 B is durable
    disk.write(8, 8, b"C")                          # done, never flushed
    disk.write(0, 4, b"D", flags=FUA)               # FUA: durable once acknowledged
    disk.write(4, 4, b"F")                          # over durable B, not flushed
    in_flight = disk.begin(WRITE, 16, 8, b"E")      # the target wrote, no answer yet
    disk.write(24, 8, b"G")
    flushing = disk.begin(FLUSH)                    # a FLUSH that never completed
    assert disk.cut() == 4
    r = disk.report
    assert (r.pc_dropped, r.pc_kept, r.pc_failed, r.pc_errno, r.pc_done) == (4, 1, 0, 0, 1)
    assert r.pc_dropped_bytes == (8 + 4 + 8 + 8) * S
    assert disk.sectors(0, 32) == [b"D"] * 4 + [b"B"] * 4 + [b"A"] * 24
    lib.us_wlog_test_end(disk.w, in_flight, 0)
    lib.us_wlog_test_end(disk.w, flushing, 0)


def test_a_kept_newer_write_keeps_its_sectors(disk):
    disk.write(0, 8, b"B")
    disk.write(4, 8, b"C")
    # keep everything the seed draws: all of them here
    assert disk.cut(keep=1.0) == 0 and disk.report.pc_kept == 2
    assert disk.sectors(0, 12) == [b"B"] * 4 + [b"C"] * 8


def test_writes_far_apart_cost_no_memory_for_the_distance():
    """The old bitmap spanned every sector between the lowest and highest
    logged write: a write at 0 and one at 2^44 asked for 2 TiB and the power
    cut failed with ENOMEM."""
    # tmpfs takes a file of 8 PiB (sparse); ext4 stops at 16 TiB
    where = tempfile.mkdtemp(dir="/dev/shm")
    d = Disk(os.path.join(where, "sparse"))
    try:
        far = 1 << 44
        d.write(0, 8, b"B")
        d.write(far, 8, b"C")
        d.write(far + 4, 8, b"D")
        assert d.cut() == 3 and d.report.pc_failed == 0
        assert d.sectors(0, 8) == [b"A"] * 8
        # past the file's old end an undo writes the zeros that were read there
        assert d.sectors(far, 12) == [b"\0"] * 12
    finally:
        d.close()
        shutil.rmtree(where)


def test_undos_that_cannot_be_written_are_failed_not_dropped(tmp_path):
    # the log reads old data fine through a read-only fd, and cannot put it back
    d = Disk(str(tmp_path / "ro"), log_flags=os.O_RDONLY)
    try:
        d.write(0, 8, b"B")
        d.write(16, 8, b"C", flags=FUA)
        d.write(32, 8, b"E")
        assert d.cut() == 0
        r = d.report
        assert (r.pc_dropped, r.pc_kept, r.pc_failed, r.pc_dropped_bytes) == (0, 1, 2, 0)
        assert r.pc_errno == errno.EBADF and r.pc_done == 1
        # nothing was undone, and the report says so
        assert d.sectors(0, 1) == [b"B"] and d.sectors(32, 1) == [b"E"]
    finally:
        d.close()
