"""IO records in blktrace's words: the binary events that `blkparse` and `btt` read
(struct blk_io_trace, version 7, as the kernel's blktrace writes them), and the line
blkparse prints for a completion.

ublkshell sees an IO when the driver hands it to the daemon and again when the daemon
commits its result. The first moment is the block layer's issue (D): the request has
left the queue for the driver. A record therefore becomes three events: Q and D at the
hand-over (btt follows an IO from its Q, so Q is there for btt; Q2D is 0 by
construction, the queueing before the hand-over is not seen here) and C at the commit.
D2C is the daemon's service time. Queues stand where blktrace puts CPUs: one file per
queue, named BASE.blktrace.Q, so `blkparse -i BASE` reads them all.
"""
import errno
import os
import stat
import struct

from .stats import fmt_ns

MAGIC = 0x65617400 | 0x07  # BLK_IO_TRACE_MAGIC | BLK_IO_TRACE_VERSION
EVENT = struct.Struct("=IIQQIIIIIHH")  # native byte order: blkparse detects it from the magic
assert EVENT.size == 48

# categories (blktrace_api.h: BLK_TC_*), shifted into the action's top half
TC_SHIFT = 16
TC_READ, TC_WRITE, TC_FLUSH, TC_SYNC = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TC_QUEUE, TC_ISSUE, TC_COMPLETE = 1 << 4, 1 << 6, 1 << 7
TC_NOTIFY, TC_META, TC_DISCARD, TC_FUA = 1 << 10, 1 << 12, 1 << 13, 1 << 15
# actions (__BLK_TA_*) and the notify a process name travels in (BLK_TN_PROCESS)
TA_QUEUE, TA_ISSUE, TA_COMPLETE = 1, 7, 8
TN_PROCESS = 0
PROCESS_NAME = b"ublkshell"


def categories(r: dict) -> int:
    """The BLK_TC_* bits of a record, as the kernel's blktrace sets them for a request: a
    flush carries only FLUSH (blkparse shows FN), discard, write-zeroes and zone append are
    writes; the zone management ops carry none (N)."""
    op = r["op"]
    if op == "read":
        c = TC_READ
    elif op == "flush":
        c = TC_FLUSH
    elif op in ("write", "discard", "write_zeroes", "zone_append"):
        c = TC_WRITE
    else:
        c = 0
    if op == "discard":
        c |= TC_DISCARD
    if "fua" in r["flags"]:
        c |= TC_FUA
    if "meta" in r["flags"]:
        c |= TC_META
    return c


def rwbs(cats: int, nbytes: int) -> str:
    """blkparse's RWBS column for these categories."""
    s = "F" if cats & TC_FLUSH else ""
    if cats & TC_DISCARD:
        s += "D"
    elif cats & TC_WRITE:
        s += "W"
    elif nbytes:
        s += "R"
    else:
        s += "N"
    if cats & TC_FUA:
        s += "F"
    if cats & TC_SYNC:
        s += "S"
    if cats & TC_META:
        s += "M"
    return s


def error_field(result: int) -> int:
    """The 16-bit error of a completion: the kernel stores the negative errno, so blkparse
    shows EIO as 65531 and success as 0."""
    return result & 0xFFFF if result < 0 else 0


def device_number(path: str | None) -> tuple[int, int]:
    """(major, minor) of the block device at path; (0, 0) without one."""
    if not path:
        return 0, 0
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    if not stat.S_ISBLK(st.st_mode):
        return 0, 0
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def kernel_dev(major: int, minor: int) -> int:
    # the kernel's own dev_t encoding (MINORBITS 20), which blktrace records
    return (major << 20) | minor


def events(r: dict) -> list[tuple[int, int, int, int, int]]:
    """(time ns, action, sector, bytes, error) of the Q, D and C events of one record."""
    cats = categories(r)
    nbytes = r["sectors"] << 9
    start, end = r["t_ns"], r["t_ns"] + r["lat_ns"]
    return [(start, TA_QUEUE | (cats | TC_QUEUE) << TC_SHIFT, r["sector"], nbytes, 0),
            (start, TA_ISSUE | (cats | TC_ISSUE) << TC_SHIFT, r["sector"], nbytes, 0),
            (end, TA_COMPLETE | (cats | TC_COMPLETE) << TC_SHIFT, r["sector"], nbytes,
             error_field(r["result"]))]


def pack(seq: int, ev: tuple, pid: int, dev: int, cpu: int) -> bytes:
    t, action, sector, nbytes, err = ev
    return EVENT.pack(MAGIC, seq, t, sector, nbytes, action, pid, dev, cpu, err, 0)


def process_note(pid: int, dev: int, cpu: int) -> bytes:
    """The notify that names pid for blkparse's [process] column."""
    pdu = PROCESS_NAME + b"\0"
    return EVENT.pack(MAGIC, 0, 0, 0, 0, TN_PROCESS | TC_NOTIFY << TC_SHIFT, pid, dev, cpu, 0,
                      len(pdu)) + pdu


class TextFormat:
    """`trace --format blkparse`: each completion as the line blkparse prints for its C
    event, then ublkshell's own words: the tag, the latency, the errno's name, the fault."""

    def __init__(self, major: int, minor: int, pid: int):
        self.major, self.minor, self.pid = major, minor, pid
        self.seq: dict[int, int] = {}

    def line(self, r: dict) -> str:
        q = r["queue"]
        self.seq[q] = self.seq.get(q, 0) + 1
        cats = categories(r)
        nbytes = r["sectors"] << 9
        t = r["t_ns"] + r["lat_ns"]
        where = f"{r['sector']} + {r['sectors']}" if nbytes else f"{r['sector']}"
        ours = f"tag={r['tag']} lat={fmt_ns(r['lat_ns'])}"
        if r["result"] < 0:
            ours += f" {errno.errorcode.get(-r['result'], str(-r['result']))}"
        fault = r.get("fault")
        if fault:
            ours += f" fault={fault}"
        return (f"{self.major:3d},{self.minor:<3d} {q:2d} {self.seq[q]:8d} {t // 10**9:5d}.{t % 10**9:09d} "
                f"{self.pid:5d}  C {rwbs(cats, nbytes):>3} {where} [{error_field(r['result'])}] {ours}")
