"""Following a device's IO records: the one cursor the CLI, the server's trace stream
and the stats tree's trace files read with, its filter and its text form.

Each face differs only in how it waits between polls (time.sleep, trio.sleep) and
where it sends what it found; the reading, merging and counting of lost records
is here, and the copying out of the shared memory is one C call per batch
(us_rec_read_batch) rather than one per record."""
import errno
import struct
import time

from .._native import ffi, lib
from ..errors import UblkError, UsageError
from ..units import parse_duration
from ..devices.ids import name as dev_name
from .names import IO_OPS, fault_label, flag_names, op_name
from .shm import Shm
from .stats import fmt_ns

# struct us_rec (records.h), native byte order; checked against the C size below
_REC = struct.Struct("=QQQQIIiHHI12x")
assert _REC.size == ffi.sizeof("struct us_rec")
# distinct op_flags a cursor remembers the names of
_NAMES_MAX = 1024
# records copied per C call: a few pages, so a poll that finds little stays cheap
BATCH = 256
# what `trace` takes after the device (Filter.parse), for help and completion
FILTER_KEYS = ("q=", "tag=", "op=", "lba=", "min_lat=", "errors", "faulted")
TRACE_FORMATS = ("text", "json", "blkparse", "fio-iolog")
TRACE_HEADER = f"{'TIME(s)':>12} {'Q':<3} {'TAG':<5} {'OP':<12} {'FLAGS':<8} SECTOR+N  LATENCY RESULT [FAULT]"


class Filter:
    """Which records `trace` shows: queue, tag, op, LBA range, min latency, errors."""

    def __init__(self, queue=None, tag=None, op=None, lba=None, min_lat_ns=0, errors=False,
                 faulted=False):
        self.queue, self.tag, self.op, self.lba = queue, tag, op, lba
        self.min_lat_ns, self.errors, self.faulted = min_lat_ns, errors, faulted

    @classmethod
    def parse(cls, words: list[str]) -> "Filter":
        f = cls()
        for w in words:
            key, eq, val = w.partition("=")
            try:
                if w == "errors":
                    f.errors = True
                elif w == "faulted":
                    f.faulted = True
                elif not eq:
                    raise UsageError(f"trace filter {w!r}: expected key=value "
                                     "(q=, tag=, op=, lba=A..B, min_lat=1ms) or 'errors', 'faulted'")
                elif key in ("q", "queue"):
                    f.queue = int(val)
                elif key == "tag":
                    f.tag = int(val)
                elif key == "op":
                    # one op or several, as fault rules take them: op=write,flush
                    ops = val.split(",")
                    bad = [o for o in ops if o not in IO_OPS]
                    if bad:
                        raise UsageError(f"trace filter op={val}: {bad[0]!r} is not an op "
                                         f"(choose from {', '.join(IO_OPS)}, or several: op=write,flush)")
                    f.op = frozenset(ops)
                elif key == "lba":
                    a, dots, b = val.partition("..")
                    f.lba = (int(a), int(b) if dots else int(a))
                    if f.lba[1] < f.lba[0]:
                        raise UsageError(f"trace filter lba={val}: the range is empty")
                elif key == "min_lat":
                    f.min_lat_ns = parse_duration(val, "trace filter min_lat")
                else:
                    raise UsageError(f"trace filter {key!r} is unknown (q, tag, op, lba, min_lat, errors, faulted)")
            except ValueError:
                raise UsageError(f"trace filter {w!r}: {val!r} is not a number") from None
        return f

    def match(self, r: dict) -> bool:
        if self.queue is not None and r["queue"] != self.queue:
            return False
        if self.tag is not None and r["tag"] != self.tag:
            return False
        if self.op is not None and r["op"] not in self.op:
            return False
        if self.lba is not None:
            end = r["sector"] + max(r["sectors"], 1) - 1
            if end < self.lba[0] or r["sector"] > self.lba[1]:
                return False
        if r["lat_ns"] < self.min_lat_ns:
            return False
        if self.errors and r["result"] >= 0:
            return False
        if self.faulted and not r.get("fault"):
            return False
        return True


class Cursor:
    """A reader's place in every queue's record ring, like trace_pipe: poll() returns what
    completed since, all queues merged by completion time; `lost` counts what the
    writers overwrote before it was read."""

    def __init__(self, s: Shm, from_start: bool = False, batch: int = BATCH, device: str | None = None):
        self.s = s
        # each record names its device as people type it; the file's own id names it otherwise
        self.device = device if device is not None else dev_name(int(s.hdr.dev_id))
        self._labels = {}  # fault field -> `delay#3`: few rules act on a device's IO
        self.batch = max(1, min(batch, s.rec_entries))
        self.buf = ffi.new("struct us_rec[]", self.batch)
        self.cursors = ffi.new("uint64_t[]", s.nr_queues)
        self._lost = ffi.new("uint64_t *")
        self._names = {}  # op_flags -> (op, flags): a device's IO carries few distinct ones
        self.base_ns = int(s.hdr.created_mono_ns)
        for q in range(s.nr_queues):
            head = lib.us_rec_head(s.base, q)
            self.cursors[q] = max(0, head - s.rec_entries) if from_start else head

    @property
    def lost(self) -> int:
        return int(self._lost[0])

    def poll(self) -> list[dict]:
        out = []
        s, buf, cursors = self.s, self.buf, self.cursors
        for q in range(s.nr_queues):
            # at most one ring's worth per queue and poll: a writer faster than this
            # reader must not keep it here forever (what it laps is counted as lost)
            left = s.rec_entries
            while left > 0:
                n = lib.us_rec_read_batch(s.base, s.size, q, ffi.addressof(cursors, q), buf,
                                          min(self.batch, left), self._lost)
                if n < 0:
                    raise UblkError(f"{s.path}: the statistics file changed its layout under its readers")
                out += self._to_dicts(n, q)
                if n < min(self.batch, left):
                    break
                left -= n
        out.sort(key=lambda r: r["t_ns"] + r["lat_ns"])
        return out

    def _to_dicts(self, n: int, q: int) -> list[dict]:
        """Every field is the file's word, shown as data; only where it was found is ours."""
        base, names, labels, device = self.base_ns, self._names, self._labels, self.device
        out = []
        # one unpack of the whole batch: cffi attribute reads per field cost more than the copy
        for (_, t, lat, sector, sectors, op_flags, result, tag, _q, fault) in _REC.iter_unpack(
                ffi.buffer(self.buf, n * _REC.size)):
            op_flags_names = names.get(op_flags)
            if op_flags_names is None:
                op_flags_names = (op_name(op_flags), flag_names(op_flags))
                # the words are the file's: one that holds every value must not grow this forever
                if len(names) < _NAMES_MAX:
                    names[op_flags] = op_flags_names
            if fault:
                label = labels.get(fault)
                if label is None:
                    label = fault_label(fault)
                    if len(labels) < _NAMES_MAX:
                        labels[fault] = label
            else:
                label = None
            # the ring it came from, not the record's q_id: a filter on q= must not be lied to
            out.append({"device": device, "t_ns": t - base, "queue": q, "tag": tag, "op": op_flags_names[0],
                        "flags": list(op_flags_names[1]), "sector": sector, "sectors": sectors,
                        "lat_ns": lat, "result": result, "fault": label})
        return out


class Follow:
    """A cursor, a filter and a count: what every face's trace loop runs between waits."""

    def __init__(self, s: Shm, flt: Filter, count: int = 0, from_start: bool = False, device: str | None = None):
        self.cursor, self.flt, self.count = Cursor(s, from_start=from_start, device=device), flt, count
        self.shown = 0

    @property
    def lost(self) -> int:
        return self.cursor.lost

    @property
    def done(self) -> bool:
        return bool(self.count) and self.shown >= self.count

    def poll(self) -> list[dict]:
        """The matching records since the last poll, cut at count."""
        got = [r for r in self.cursor.poll() if self.flt.match(r)]
        if self.count:
            got = got[: self.count - self.shown]
        self.shown += len(got)
        return got


def format_record(r: dict) -> str:
    flags = ",".join(r["flags"]) or "-"
    res = str(r["result"]) if r["result"] >= 0 else f"-{errno.errorcode.get(-r['result'], -r['result'])}"
    fault = r.get("fault")
    return (f"{r['t_ns'] / 1e9:12.6f} q{r['queue']:<2} t{r['tag']:<4} {r['op']:<12} {flags:<8} "
            f"{r['sector']}+{r['sectors']:<6} {fmt_ns(r['lat_ns']):>8} {res}" + (f" {fault}" if fault else ""))


def follow(s: Shm, flt: Filter, emit, count: int = 0, duration: float = 0.0,
           from_start: bool = False, interval: float = 0.05, device: str | None = None) -> int:
    """Call emit(record) for matching records until count/duration or Ctrl-C; returns
    records lost."""
    f = Follow(s, flt, count=count, from_start=from_start, device=device)
    deadline = time.monotonic() + duration if duration else None
    try:
        while True:
            for r in f.poll():
                emit(r)
            if f.done or (deadline and time.monotonic() >= deadline):
                return f.lost
            time.sleep(interval)
    except KeyboardInterrupt:
        # Ctrl-C is how most traces end: the reader must still learn what it missed
        return f.lost
