"""`stats ID --interval`: a row per interval as iostat -x prints it, from the kernel's
/sys/block/NAME/stat for the device, beside what the daemon's own counters say of the same
interval.

The block layer's columns (r/s, w/s, rMiB/s, wMiB/s, r_await, w_await, aqu-sz, %util) are
computed as iostat computes them: await is the IO ticks of the interval over its IOs (the
whole time an IO took, queueing included), aqu-sz the weighted ticks over the interval, %util
the busy ticks over the interval. r_svc and w_svc are the daemon's service time (hand-over to
commit) averaged over the interval's IOs: await minus svc is what the kernel and the queue
added. A FUSE device without a loop device has no block device: its kernel columns are `-`.
"""
import os
import time

from .shm import Shm
from .stats import snapshot

# /sys/block/NAME/stat fields (Documentation/block/stat.rst) this needs
STAT_FIELDS = ("reads", "read_merges", "read_sectors", "read_ticks", "writes", "write_merges",
               "write_sectors", "write_ticks", "in_flight", "io_ticks", "time_in_queue")
COLUMNS = ("r/s", "w/s", "rMiB/s", "wMiB/s", "r_await", "w_await", "aqu-sz", "%util", "r_svc", "w_svc")


def block_name(node: str | None) -> str | None:
    """The /sys/block name of a block device node (/dev/ublkb0 -> ublkb0, /dev/loop3 -> loop3)."""
    if not node or not node.startswith("/dev/"):
        return None
    name = os.path.basename(node)
    return name if os.path.isdir(f"/sys/block/{name}") else None


def read_block_stat(name: str | None) -> dict | None:
    if not name:
        return None
    try:
        with open(f"/sys/block/{name}/stat") as f:
            values = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None
    return dict(zip(STAT_FIELDS, values)) if len(values) >= len(STAT_FIELDS) else None


def sample(s: Shm, block: str | None) -> dict:
    snap = snapshot(s)
    ours = {op: {k: snap["ops"][op][k] for k in ("ios", "lat_sum_ns")} for op in ("read", "write")}
    return {"t": time.monotonic(), "sys": read_block_stat(block), "ours": ours}


def row(a: dict, b: dict) -> dict:
    """The interval from sample a to sample b, in iostat's columns (None: not known)."""
    dt = b["t"] - a["t"]
    out = dict.fromkeys(COLUMNS)
    out["interval_s"] = round(dt, 3)
    if a["sys"] and b["sys"] and dt > 0:
        d = {k: b["sys"][k] - a["sys"][k] for k in STAT_FIELDS if k != "in_flight"}
        ms = dt * 1000
        out["r/s"] = d["reads"] / dt
        out["w/s"] = d["writes"] / dt
        out["rMiB/s"] = d["read_sectors"] * 512 / dt / (1 << 20)
        out["wMiB/s"] = d["write_sectors"] * 512 / dt / (1 << 20)
        out["r_await"] = d["read_ticks"] / d["reads"] if d["reads"] else 0.0
        out["w_await"] = d["write_ticks"] / d["writes"] if d["writes"] else 0.0
        out["aqu-sz"] = d["time_in_queue"] / ms
        out["%util"] = min(100.0, d["io_ticks"] / ms * 100)
    for op, col in (("read", "r_svc"), ("write", "w_svc")):
        n = b["ours"][op]["ios"] - a["ours"][op]["ios"]
        lat = b["ours"][op]["lat_sum_ns"] - a["ours"][op]["lat_sum_ns"]
        out[col] = lat / n / 1e6 if n > 0 else 0.0  # ms, as iostat's awaits
    return out


HEADER = ("Device            " + "".join(f"{c:>9}" for c in COLUMNS))


def render_row(device: str, r: dict) -> str:
    def cell(col):
        v = r[col]
        if v is None:
            return f"{'-':>9}"
        # times in ms to the microsecond: the daemon's service time is often well under 0.01 ms
        return f"{v:9.3f}" if "await" in col or "svc" in col else f"{v:9.2f}"
    return f"{device:<18}" + "".join(cell(c) for c in COLUMNS)
