"""What `top` shows, as pure functions over `stats` results, so that the
numbers can be checked without a terminal, a server or a device.

Rates (IOPS, MB/s) are the difference of two `stats` results over the time
between them. The latency columns come from the newer result alone: `stats`
carries per-op summaries, not histograms, and percentiles of an interval
cannot be recovered from two cumulative percentiles. Rows are per op for the
same reason: percentiles of different ops do not add up into one."""
import time

from ..devices import ids as devids
from ..observe.names import OPS
from ..observe.stats import fmt_ns

CLEAR = "\x1b[H\x1b[2J"
HEADER = (f"{'DEV':>4} {'Q':<4} {'OP':<13}{'IOPS':>10}{'MB/s':>10}{'AVG':>9}{'P50':>9}"
          f"{'P99':>9}{'MAX':>9}{'INFLIGHT':>10}")


def _rate(new: int, old, elapsed: float):
    # None when there is nothing to compare with, or the counters went back
    # (the id now belongs to a new device): a dash, never a negative rate
    if old is None or elapsed <= 0 or new < old:
        return None
    return (new - old) / elapsed


def group_rows(label: str, old_ops, new_ops: dict, inflight: int, elapsed: float) -> list[dict]:
    """One row per op that has seen IO (a single '-' row if none did).
    old_ops is None for the first sample of a device."""
    active = [op for op in OPS if new_ops.get(op, {}).get("ios")]
    rows = []
    for i, op in enumerate(active or ["-"]):
        n = new_ops.get(op) or {"ios": 0, "bytes": 0, "avg_ns": 0, "p50_ns": 0, "p99_ns": 0, "max_ns": 0}
        o = None if old_ops is None else old_ops.get(op) or {"ios": 0, "bytes": 0}
        iops = _rate(n["ios"], o and o["ios"], elapsed)
        bps = _rate(n["bytes"], o and o["bytes"], elapsed)
        rows.append({
            "label": label, "op": op, "iops": iops, "mbps": None if bps is None else bps / 1e6,
            "avg_ns": n["avg_ns"], "p50_ns": n["p50_ns"], "p99_ns": n["p99_ns"], "max_ns": n["max_ns"],
            # in flight is counted per queue, not per op: shown once per group
            "inflight": inflight if i == 0 else None,
        })
    return rows


def device_rows(old, new: dict, elapsed: float) -> list[dict]:
    """The device's rows ('all' queues first), then each queue's."""
    if old is not None and old.get("device") != new.get("device"):
        old = None
    rows = group_rows("all", old["ops"] if old else None, new["ops"], new["inflight"], elapsed)
    old_q = {q["queue"]: q for q in old["queues"]} if old else {}
    for q in new["queues"]:
        prev = old_q.get(q["queue"])
        rows += group_rows(f"q{q['queue']}", prev["ops"] if prev else None, q["ops"], q["inflight"], elapsed)
    for r in rows:
        r["device"] = new["device"]
    return rows


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_row(r: dict) -> str:
    iops = "-" if r["iops"] is None else f"{r['iops']:.0f}" if r["iops"] >= 100 else f"{r['iops']:.1f}"
    lat = [fmt_ns(r[k]) if r["op"] != "-" else "-" for k in ("avg_ns", "p50_ns", "p99_ns", "max_ns")]
    return (f"{devids.name(r['device']):>4} {r['label']:<4} {r['op']:<13}{iops:>10}{_num(r['mbps'], '.2f'):>10}"
            f"{lat[0]:>9}{lat[1]:>9}{lat[2]:>9}{lat[3]:>9}{_num(r['inflight'], 'd'):>10}")


def render_top(samples: list, elapsed: float, interval: float, now=None) -> str:
    """samples: (dev_id, old stats or None, new stats or None, error or None) per device."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"ublkshell top  {stamp}  every {interval:g}s, rates over the last {elapsed:.2f}s, "
             "latency since the device started  (Ctrl-C: back to the prompt)", HEADER]
    if not samples:
        lines.append("  no devices")
    for dev_id, old, new, error in samples:
        if error is not None:
            lines.append(f"{devids.name(dev_id):>4} {error}")
            continue
        lines += [format_row(r) for r in device_rows(old, new, elapsed)]
    return "\n".join(lines)
