"""What `top` shows, as pure functions over two `stats --histograms` results, so that the
numbers can be checked without a terminal, a server or a device.

Everything in a frame is of the interval between the two results: IOPS and MiB/s are
differences of the counters, the average is the difference of the latency sums over the
difference of the IOs, and the percentiles come from the difference of the histograms (the
IOs that completed in the interval, not since the device started). Rows are per op because
percentiles of different ops do not add up into one. Frames fit 80 columns."""
import time

from ..observe.names import OPS
from ..observe.stats import bucket_percentiles, fmt_ns

WIDTH = 80
HEADER = (f"{'DEV':<6} {'Q':<3} {'OP':<12}{'IOPS':>8}{'MiB/s':>8}{'AVG':>8}{'P50':>8}{'P99':>8}"
          f"{'P99.9':>8}{'INFL':>6}")
LATENCY_KEYS = ("avg_ns", "p50_ns", "p99_ns", "p999_ns")


def _counts(op: dict) -> dict[int, int]:
    return {b["low_ns"]: b["count"] for b in op.get("buckets", ())}


def interval_op(old: dict | None, new: dict, elapsed: float) -> dict:
    """One op's rates and latency over the interval (None: nothing to compare with, or the
    counters went back because the id now names a new device: a dash, never a negative)."""
    out = {"iops": None, "mibps": None, **dict.fromkeys(LATENCY_KEYS)}
    if old is None or elapsed <= 0 or new["ios"] < old["ios"] or new["bytes"] < old["bytes"]:
        return out
    ios = new["ios"] - old["ios"]
    out["iops"] = ios / elapsed
    out["mibps"] = (new["bytes"] - old["bytes"]) / elapsed / (1 << 20)
    if ios:
        out["avg_ns"] = (new.get("lat_sum_ns", 0) - old.get("lat_sum_ns", 0)) // ios
        before = _counts(old)
        delta = {low: n - before.get(low, 0) for low, n in _counts(new).items()}
        # a sample taken between an IO's count and its bucket has nothing to rank: dashes
        if sum(n for n in delta.values() if n > 0):
            pct = bucket_percentiles(delta, new["max_ns"])
            out.update({k: pct[k] for k in ("p50_ns", "p99_ns", "p999_ns")})
    return out


def group_rows(label: str, old_ops, new_ops: dict, inflight: int, elapsed: float) -> list[dict]:
    """One row per op that has seen IO since the device started (a single '-' row if none
    has). old_ops is None for the first sample of a device."""
    active = [op for op in OPS if new_ops.get(op, {}).get("ios")]
    rows = []
    for i, op in enumerate(active or ["-"]):
        if op == "-":
            none = {"ios": 0, "bytes": 0, "max_ns": 0}
            iv = interval_op(None if old_ops is None else none, none, elapsed)
        else:
            iv = interval_op(None if old_ops is None else old_ops.get(op) or {"ios": 0, "bytes": 0},
                             new_ops[op], elapsed)
        # in flight is counted per queue, not per op: shown once per group
        rows.append({"label": label, "op": op, **iv, "inflight": inflight if i == 0 else None})
    return rows


def device_rows(old, new: dict, elapsed: float) -> list[dict]:
    """The device's rows ('all' queues), then each queue's when there is more than one."""
    if old is not None and old.get("device") != new.get("device"):
        old = None
    rows = group_rows("all", old["ops"] if old else None, new["ops"], new["inflight"], elapsed)
    if len(new["queues"]) > 1:
        old_q = {q["queue"]: q for q in old["queues"]} if old else {}
        for q in new["queues"]:
            prev = old_q.get(q["queue"])
            rows += group_rows(f"q{q['queue']}", prev["ops"] if prev else None, q["ops"], q["inflight"],
                               elapsed)
    return rows


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_row(name: str, r: dict) -> str:
    iops = "-" if r["iops"] is None else f"{r['iops']:.0f}" if r["iops"] >= 100 else f"{r['iops']:.1f}"
    lat = ["-" if r[k] is None else fmt_ns(r[k]) for k in LATENCY_KEYS]
    return (f"{name[:6]:<6} {r['label']:<3} {r['op']:<12}{iops:>8}{_num(r['mibps'], '.2f'):>8}"
            + "".join(f"{v:>8}" for v in lat) + f"{_num(r['inflight'], 'd'):>6}")


def render_top(samples: list, elapsed: float, interval: float, now=None) -> str:
    """samples: (device name, old stats or None, new stats or None, error or None) per device."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"ublkshell top  {stamp}  every {interval:g}s, over the last {elapsed:.2f}s",
             "latency: the daemon's service time of the IOs completed in the interval",
             HEADER]
    if not samples:
        lines.append("  no devices")
    for name, old, new, error in samples:
        if error is not None:
            lines.append(f"{name[:6]:<6} {error}"[:WIDTH])
            continue
        lines += [format_row(name, r) for r in device_rows(old, new, elapsed)]
    return "\n".join(lines)
