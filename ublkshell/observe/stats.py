"""Numbers derived from a device's shared memory: counters, percentiles from
the log-linear histograms, tags in flight, and a tail over the record rings."""
import time

from .._native import ffi, lib
from .shm import OP_NAMES, OPS, Shm
from ..errors import UsageError
from ..units import parse_duration

FLAG_NAMES = ((lib.UBLK_IO_F_FUA, "fua"), (lib.UBLK_IO_F_NOUNMAP, "nounmap"),
              (lib.UBLK_IO_F_FAILFAST_DEV, "failfast"), (lib.UBLK_IO_F_META, "meta"),
              (lib.UBLK_IO_F_SWAP, "swap"))


def op_name(op_flags: int) -> str:
    op = op_flags & 0xFF
    return OP_NAMES.get(op, f"op{op}")


def flag_names(op_flags: int) -> list[str]:
    return [n for bit, n in FLAG_NAMES if op_flags & bit]


def percentile(hist: list[int], p: float) -> int:
    """The value (ns) below which p percent of the samples fall (bucket midpoint)."""
    total = sum(hist)
    if not total:
        return 0
    want = max(1, -(-total * p // 100))
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= want:
            lo = lib.us_hist_low(i)
            hi = lib.us_hist_low(i + 1) if i + 1 < len(hist) else lo
            return (lo + hi) // 2
    return lib.us_hist_low(len(hist) - 1)


def snapshot(s: Shm) -> dict:
    """Per op: counters summed over queues, plus per-queue counters."""
    ops = {name: {"ios": 0, "bytes": 0, "errors": 0, "lat_sum_ns": 0, "lat_max_ns": 0,
                  "hist": [0] * lib.US_HIST_BUCKETS} for name in OPS}
    queues = []
    for q in range(s.nr_queues):
        sq = s.queue(q)
        qd = {"queue": q, "inflight": int(sq.inflight), "ops": {}}
        for i, name in enumerate(OPS):
            o = sq.ops[i]
            hist = list(ffi.unpack(o.hist, lib.US_HIST_BUCKETS))
            vals = {"ios": int(o.ios), "bytes": int(o.bytes), "errors": int(o.errors),
                    "lat_sum_ns": int(o.lat_sum_ns), "lat_max_ns": int(o.lat_max_ns)}
            qd["ops"][name] = dict(vals, hist=hist)
            t = ops[name]
            for k in ("ios", "bytes", "errors", "lat_sum_ns"):
                t[k] += vals[k]
            t["lat_max_ns"] = max(t["lat_max_ns"], vals["lat_max_ns"])
            t["hist"] = [a + b for a, b in zip(t["hist"], hist)]
        queues.append(qd)
    return {"ops": ops, "queues": queues, "inflight": sum(q["inflight"] for q in queues),
            "at_ns": lib.us_now_ns()}


def summarize(op: dict) -> dict:
    n = op["ios"]
    return {"ios": n, "bytes": op["bytes"], "errors": op["errors"],
            "avg_ns": op["lat_sum_ns"] // n if n else 0, "max_ns": op["lat_max_ns"],
            "p50_ns": percentile(op["hist"], 50), "p99_ns": percentile(op["hist"], 99),
            "p999_ns": percentile(op["hist"], 99.9)}


def inflight(s: Shm) -> list[dict]:
    now = lib.us_now_ns()
    out = []
    for q in range(s.nr_queues):
        tags = s.tags(q)
        for t in range(s.depth):
            ts = tags[t]
            if ts.state:
                out.append({"queue": q, "tag": t, "op": op_name(ts.op_flags),
                            "flags": flag_names(ts.op_flags), "sector": int(ts.start_sector),
                            "sectors": int(ts.nr_sectors), "age_ns": max(0, now - int(ts.t_start_ns)),
                            "fault": int(ts.fault)})
    return out


def fmt_ns(ns: int) -> str:
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1000:.3g}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g}ms"
    return f"{ns / 1e9:.3g}s"


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
                    if val not in OP_NAMES.values():
                        raise UsageError(f"trace filter op={val}: choose from {', '.join(OP_NAMES.values())}")
                    f.op = val
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
        if self.op is not None and r["op"] != self.op:
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


class Tail:
    """Follows every queue's record ring with its own cursors, like trace_pipe."""

    def __init__(self, s: Shm, from_start: bool = False):
        self.s = s
        self.rec = ffi.new("struct us_rec *")
        self.cursor = []
        for q in range(s.nr_queues):
            head = lib.us_rec_head(s.base, q)
            start = max(0, head - s.rec_entries) if from_start else head
            self.cursor.append(start)
        self.lost = 0

    def poll(self) -> list[dict]:
        out = []
        entries = self.s.rec_entries
        for q in range(self.s.nr_queues):
            head = lib.us_rec_head(self.s.base, q)
            seq = self.cursor[q]
            if head - seq > entries:
                self.lost += head - entries - seq
                seq = head - entries
            while seq < head:
                rc = lib.us_rec_read(self.s.base, q, seq, self.rec)
                if rc == 1:
                    out.append(self._to_dict(self.rec, q))
                elif rc < 0:
                    self.lost += 1
                else:
                    break
                seq += 1
            self.cursor[q] = seq
        out.sort(key=lambda r: r["t_ns"] + r["lat_ns"])
        return out

    def _to_dict(self, r, q: int) -> dict:
        """Every field is the file's word, shown as data; only where it was found is ours."""
        base = self.s.hdr.created_mono_ns
        # the ring it came from, not the record's q_id: a filter on q= must not be lied to
        return {"t_ns": int(r.t_start_ns) - base, "queue": q, "tag": int(r.tag),
                "op": op_name(r.op_flags), "flags": flag_names(r.op_flags),
                "sector": int(r.start_sector), "sectors": int(r.nr_sectors),
                "lat_ns": int(r.lat_ns), "result": int(r.result), "fault": int(r.fault)}


def format_record(r: dict) -> str:
    from ..faults.grammar import fault_label

    flags = ",".join(r["flags"]) or "-"
    res = str(r["result"]) if r["result"] >= 0 else f"-{__import__('errno').errorcode.get(-r['result'], -r['result'])}"
    fault = fault_label(r.get("fault", 0))
    return (f"{r['t_ns'] / 1e9:12.6f} q{r['queue']:<2} t{r['tag']:<4} {r['op']:<12} {flags:<8} "
            f"{r['sector']}+{r['sectors']:<6} {fmt_ns(r['lat_ns']):>8} {res}" + (f" {fault}" if fault else ""))


def follow(s: Shm, flt: Filter, emit, count: int = 0, duration: float = 0.0,
           from_start: bool = False, interval: float = 0.05) -> int:
    """Call emit(record) for matching records until count/duration or Ctrl-C; returns
    records lost."""
    tail = Tail(s, from_start=from_start)
    shown = 0
    deadline = time.monotonic() + duration if duration else None
    try:
        while True:
            for r in tail.poll():
                if flt.match(r):
                    emit(r)
                    shown += 1
                    if count and shown >= count:
                        return tail.lost
            if deadline and time.monotonic() >= deadline:
                return tail.lost
            time.sleep(interval)
    except KeyboardInterrupt:
        # Ctrl-C is how most traces end: the reader must still learn what it missed
        return tail.lost
