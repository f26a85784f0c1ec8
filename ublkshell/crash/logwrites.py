"""dm-log-writes' on-disk log format: read a log the kernel's log-writes target wrote,
entry by entry, checking every field against the file before use.

Layout (drivers/md/dm-log-writes.c): the super block fills the first log sector; each entry
is one sector holding its header (and a mark's name), then, unless it is a discard, the
nr_sectors sectors of data it wrote. Sectors are the logged device's logical block size,
recorded in the super block; entry sectors and counts are in those units, not 512 bytes.
Only the first nr_entries entries count: the kernel rewrites the super block after FUA
writes and marks, so entries past it were logged but never made part of the log."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterator

from ..errors import UblkError

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize
ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len

FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
FLAG_NAMES = ((FLUSH, "flush"), (FUA, "fua"), (DISCARD, "discard"), (MARK, "mark"), (METADATA, "meta"))
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
# bounds a forged header cannot pass: sector sizes a block device has, and a device's sector
# count in 64 bits of bytes
MIN_SECTOR, MAX_SECTOR = 512, 65536
MAX_DEV_BYTES = 1 << 63


class LogError(UblkError):
    """A file that is not a dm-log-writes log, or one that is cut short or damaged."""


@dataclass(frozen=True)
class Entry:
    index: int          # 0-based, as fstests' replay-log counts (--limit, --start-entry)
    sector: int         # in the log's sector size
    nr_sectors: int
    flags: int
    mark: str | None    # a MARK entry's name
    data_at: int        # byte offset of the written data in the log (-1: no data)

    @property
    def persists(self) -> bool:
        """A persistence point: what came before is on stable storage once this completes."""
        return bool(self.flags & (FLUSH | FUA))


@dataclass(frozen=True)
class Super:
    nr_entries: int
    sectorsize: int


def flag_names(flags: int) -> str:
    return "|".join(n for bit, n in FLAG_NAMES if flags & bit) or "write"


class Log:
    """An open log file. Iterating reads headers only; data is read on demand (read_data)."""

    def __init__(self, path: str):
        self.path = path
        try:
            # O_NONBLOCK: a FIFO named as the log is refused below, not waited on
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise LogError(f"{path}: {e.strerror}") from None
        try:
            self.size = _size_of(self.fd, path)
            head = os.pread(self.fd, SUPER.size, 0)
            if len(head) < SUPER.size:
                raise LogError(f"{path}: too short for a dm-log-writes log ({len(head)} bytes)")
            magic, version, nr, sectorsize = SUPER.unpack(head)
            if magic != MAGIC:
                raise LogError(f"{path}: not a dm-log-writes log (magic {magic:#x}, expected {MAGIC:#x})")
            if version != VERSION:
                raise LogError(f"{path}: log version {version}; only version {VERSION} is known")
            if not MIN_SECTOR <= sectorsize <= MAX_SECTOR or sectorsize & (sectorsize - 1):
                raise LogError(f"{path}: sector size {sectorsize} is not a power of two in "
                               f"{MIN_SECTOR}..{MAX_SECTOR}")
            # each entry takes at least a sector: a count the file cannot hold is damage
            if nr > max(0, self.size // sectorsize - 1):
                raise LogError(f"{path}: the super block counts {nr} entries, more than "
                               f"{self.size} bytes can hold (truncated log?)")
            self.super = Super(nr, sectorsize)
            self.end_at = -1   # after a full iteration: the byte after the last counted entry
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Log":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Entry]:
        ss = self.super.sectorsize
        pos = ss
        for index in range(self.super.nr_entries):
            where = f"{self.path}: entry {index} (byte {pos})"
            head = os.pread(self.fd, ss, pos)
            if len(head) < ss:
                raise LogError(f"{where}: the log ends inside it (truncated log?)")
            sector, nr_sectors, flags, data_len = ENTRY.unpack_from(head)
            if flags & ~KNOWN_FLAGS:
                raise LogError(f"{where}: unknown flags {flags:#x}")
            if nr_sectors * ss > MAX_DEV_BYTES or (sector + nr_sectors) * ss > MAX_DEV_BYTES:
                raise LogError(f"{where}: sectors {sector}+{nr_sectors} are past any device")
            mark = None
            if flags & MARK:
                if data_len > ss - ENTRY.size:
                    raise LogError(f"{where}: a mark of {data_len} bytes does not fit its sector")
                mark = head[ENTRY.size:ENTRY.size + data_len].decode("utf-8", "backslashreplace")
            data_at = -1
            pos += ss
            if nr_sectors and not flags & (DISCARD | MARK):
                data_at = pos
                pos += nr_sectors * ss
                if pos > self.size:
                    raise LogError(f"{where}: its {nr_sectors * ss} bytes of data run past the end of "
                                   "the log (truncated log?)")
            yield Entry(index, sector, nr_sectors, flags, mark, data_at)
        self.end_at = pos

    def read_data(self, entry: Entry, offset: int, length: int) -> bytes:
        """length bytes of entry's data from byte offset within it."""
        data = os.pread(self.fd, length, entry.data_at + offset)
        if len(data) != length:
            raise LogError(f"{self.path}: entry {entry.index}: the log ends inside its data")
        return data


def _size_of(fd: int, path: str) -> int:
    import stat

    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        # a log device as dm-log-writes writes it: its size is the device's
        return os.lseek(fd, 0, os.SEEK_END)
    raise LogError(f"{path}: a log is a file or a block device")


def pack_super(nr_entries: int, sectorsize: int) -> bytes:
    return SUPER.pack(MAGIC, VERSION, nr_entries, sectorsize).ljust(sectorsize, b"\0")


def pack_entry(sector: int, nr_sectors: int, flags: int, mark: str | None, sectorsize: int) -> bytes:
    """One entry's header sector (the data, if any, follows it)."""
    text = mark.encode() if mark is not None else b""
    if len(text) > sectorsize - ENTRY.size - 1:
        raise UblkError(f"a mark is at most {sectorsize - ENTRY.size - 1} bytes")
    return (ENTRY.pack(sector, nr_sectors, flags, len(text)) + text).ljust(sectorsize, b"\0")
