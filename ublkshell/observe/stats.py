"""Numbers derived from a device's shared memory: counters, percentiles from
the log-linear histograms, tags in flight (the record rings: trace.py)."""
from .._native import ffi, lib
from ..devices.ids import name as dev_name
from .names import OPS, fault_label, flag_names, op_name
from .shm import Shm


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
        qd = {"queue": q, "inflight": int(sq.inflight), "ops": {},
              "ring": {k: int(getattr(sq, k)) for k in RING_COUNTERS}}
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
            "ring": {k: sum(q["ring"][k] for q in queues) for k in RING_COUNTERS},
            "at_ns": lib.us_now_ns()}


# what the queue threads cost in user/kernel crossings (records.h, struct us_shm_queue)
RING_COUNTERS = ("enters", "cqes", "fetches", "commits", "committed", "copied")


def ring_costs(ring: dict) -> dict:
    """The counters and their ratios: io_uring_enter calls per IO, CQEs per enter, IOs per commit."""
    ios, enters, commits = ring["committed"], ring["enters"], ring["commits"]
    return dict(ring, enters_per_io=round(enters / ios, 4) if ios else None,
                cqes_per_enter=round(ring["cqes"] / enters, 2) if enters else None,
                ios_per_commit=round(ios / commits, 2) if commits else None)


def summarize(op: dict) -> dict:
    """Counters and latency: average, max, and p50/p90/p99/p99.9 from the histogram. A
    percentile is its bucket's midpoint, so it is held to the max actually seen."""
    n, top = op["ios"], op["lat_max_ns"]
    pct = {f"p{k}_ns": min(percentile(op["hist"], p), top) for k, p in PERCENTILES.items()}
    return {"ios": n, "bytes": op["bytes"], "errors": op["errors"],
            "avg_ns": op["lat_sum_ns"] // n if n else 0, "max_ns": top, **pct}


# the percentiles every face shows: key suffix -> percent
PERCENTILES = {"50": 50, "90": 90, "99": 99, "999": 99.9}


def stats_of(dev_id: int, shm, histograms: bool = False) -> dict:
    """Summaries per op, for the device and for each queue (the `stats --json` shape).
    histograms: each op also carries its buckets and latency sum, so that two results give
    the latency of the interval between them (`top`)."""
    snap = snapshot(shm)

    def ops(od):
        return {n: dict(summarize(o), buckets=buckets(o["hist"]), lat_sum_ns=o["lat_sum_ns"])
                if histograms else summarize(o) for n, o in od.items()}
    device = dev_name(dev_id)
    return {"device": device, "inflight": snap["inflight"],
            "ops": ops(snap["ops"]), "ring": ring_costs(snap["ring"]),
            # each queue's entry is the tree's queues/N/stats.json too (schema kind queue_stats)
            "queues": [{"device": device, "queue": q["queue"], "inflight": q["inflight"],
                        "ops": ops(q["ops"]),
                        "ring": ring_costs(q["ring"])} for q in snap["queues"]]}


def buckets(hist: list[int]) -> list[dict]:
    """The histogram's non-empty buckets with their bounds (what every JSON face shows)."""
    last = len(hist) - 1
    return [{"low_ns": lib.us_hist_low(i), "high_ns": lib.us_hist_low(i + 1) if i < last else lib.us_hist_low(i),
             "count": n} for i, n in enumerate(hist) if n]


def bucket_percentiles(counts: dict[int, int], top_ns: int) -> dict:
    """p50..p99.9 of buckets given as {low_ns: count} (e.g. the difference of two samples),
    each held to top_ns as summarize() holds them to the max."""
    hist = [0] * lib.US_HIST_BUCKETS
    index = _bucket_index()
    for low, n in counts.items():
        if low in index and n > 0:
            hist[index[low]] += n
    return {f"p{k}_ns": min(percentile(hist, p), top_ns) for k, p in PERCENTILES.items()}


_INDEX: dict[int, int] = {}


def _bucket_index() -> dict[int, int]:
    if not _INDEX:
        for i in range(lib.US_HIST_BUCKETS):
            _INDEX[lib.us_hist_low(i)] = i
    return _INDEX


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
                            "fault": fault_label(int(ts.fault)) or None})
    return out


def fmt_ns(ns: int) -> str:
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1000:.3g}us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g}ms"
    return f"{ns / 1e9:.3g}s"
