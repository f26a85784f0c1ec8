"""Every device's counters in the Prometheus text format (and OpenMetrics): the `metrics`
verb and the stats tree's `metrics` file, for node_exporter's textfile collector or a
scrape. One sample set, two spellings: OpenMetrics names a counter's family without its
`_total` and ends with `# EOF`.

Labels: device (its name, `0` or `fuse0`), queue, op, and for fault hits the rule's id and
action. Latency is the daemon's service time (from the hand-over to the commit) as a
histogram with power-of-two bounds from 1.024 us to 17.2 s: the bucket `le=2^k ns` counts
the IOs the daemon's log-linear buckets put below 2^k ns.
"""
from typing import Callable

from .._native import lib
from .. import procs
from ..errors import UblkError
from ..devices.ids import name as dev_name
from ..devices.io_modes import io_mode_of, zero_copy_of
from .names import OPS
from .shm import Shm
from .stats import RING_COUNTERS, snapshot

PREFIX = "ublkshell"
# histogram bounds: 2^10 .. 2^34 ns
BOUNDS_NS = [1 << k for k in range(10, 35)]
RING_HELP = {
    "enters": "io_uring_enter calls of the queue's thread",
    "cqes": "completions the queue's thread reaped",
    "fetches": "completions that brought requests in",
    "commits": "commands that took results back to the driver",
    "committed": "IOs those commands carried",
    "copied": "IOs a zero-copy device copied after all",
}


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(d: dict) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in d.items()) + "}" if d else ""


def _num(v) -> str:
    if isinstance(v, float):
        return repr(v) if v != int(v) or abs(v) >= 1e15 else f"{v:.1f}"
    return str(int(v))


class _Out:
    def __init__(self, openmetrics: bool):
        self.om = openmetrics
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> str:
        """Declare a family; returns the name its samples take."""
        full = f"{PREFIX}_{name}"
        fam = full[: -len("_total")] if self.om and kind == "counter" and full.endswith("_total") else full
        self.lines += [f"# HELP {fam} {help_}", f"# TYPE {fam} {kind}"]
        return full

    def sample(self, name: str, labels: dict, value) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")


def exposition(entries: dict[int, dict], shm_of: Callable[[int], Shm | None], openmetrics: bool = False) -> str:
    """The text of every device in entries (id -> registry entry), whose statistics
    shm_of(id) maps (None: gone; the device's other samples still show)."""
    out = _Out(openmetrics)
    devs = []
    for dev in sorted(entries):
        d = _device(dev, entries[dev], shm_of)
        if d:
            devs.append(d)

    info = out.family("device_info", "gauge", "A device ublkshell serves; its labels say what it is.")
    for dev, e, _snap, _rules in devs:
        out.sample(info, {"device": dev_name(dev), **e["labels"]}, 1)
    size = out.family("device_size_bytes", "gauge", "Size of the device in bytes.")
    for dev, e, _snap, _rules in devs:
        if e["size"] is not None:
            out.sample(size, {"device": dev_name(dev)}, e["size"])
    up = out.family("daemon_up", "gauge", "1 while the device's IO daemon runs, 0 once it died.")
    for dev, e, _snap, _rules in devs:
        out.sample(up, {"device": dev_name(dev)}, e["up"])
    restarts = out.family("daemon_recoveries_total", "counter",
                          "Times a new daemon took the device over after one died (recover).")
    for dev, e, _snap, _rules in devs:
        out.sample(restarts, {"device": dev_name(dev)}, e["recoveries"])

    per_q = [(dev, q) for dev, _e, snap, _r in devs if snap for q in snap["queues"]]
    for key, help_ in (("ios", "IOs completed"), ("bytes", "bytes moved by completed IOs"),
                       ("errors", "IOs completed with an error")):
        fam = out.family(f"io_{key}_total" if key != "ios" else "ios_total", "counter", f"{help_}, per queue and op.")
        for dev, q in per_q:
            for op in OPS:
                out.sample(fam, {"device": dev_name(dev), "queue": q["queue"], "op": op}, q["ops"][op][key])
    inflight = out.family("inflight_ios", "gauge", "IOs the daemon is serving now, per queue.")
    for dev, q in per_q:
        out.sample(inflight, {"device": dev_name(dev), "queue": q["queue"]}, q["inflight"])
    for key in RING_COUNTERS:
        fam = out.family(f"ring_{key}_total", "counter", f"{RING_HELP[key]}, per queue.")
        for dev, q in per_q:
            out.sample(fam, {"device": dev_name(dev), "queue": q["queue"]}, q["ring"][key])

    hist = out.family("io_service_seconds", "histogram",
                      "Daemon service time of completed IOs (hand-over to commit), per op.")
    for dev, _e, snap, _r in devs:
        if not snap:
            continue
        for op in OPS:
            o = snap["ops"][op]
            labels = {"device": dev_name(dev), "op": op}
            # the histogram's own total, not `ios` (a separate counter read a moment apart):
            # the buckets never step down and +Inf is _count
            total = sum(o["hist"])
            for le, n in _cumulative(o["hist"]):
                out.sample(hist + "_bucket", dict(labels, le=le), n)
            out.sample(hist + "_bucket", dict(labels, le="+Inf"), total)
            out.sample(hist + "_count", labels, total)
            out.sample(hist + "_sum", labels, o["lat_sum_ns"] / 1e9)

    hits = out.family("fault_hits_total", "counter", "IOs each fault rule matched.")
    for dev, _e, _snap, rules in devs:
        for r in rules:
            out.sample(hits, {"device": dev_name(dev), "rule": r["id"], "action": r["action"]}, r["hits"])
    if openmetrics:
        out.lines.append("# EOF")
    return "\n".join(out.lines) + "\n"


def _device(dev: int, e: dict, shm_of):
    """(id, labels and numbers from its entry, its counters, its fault rules), or None for a
    device whose entry or statistics cannot be read now (the others still show)."""
    try:
        flags = int(e.get("flags") or 0)
        fuse = e.get("transport") == "fuse"
        size = e.get("size")
        about = {"labels": {"target": str(e.get("target") or "-"), "transport": "fuse" if fuse else "ublk",
                            "io_mode": str(e.get("io_mode") or ("-" if fuse else io_mode_of(flags))),
                            "zero_copy": str(zero_copy_of(flags)).lower()},
                 "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
                 "up": 1 if procs.entry_daemon_alive(e) else 0, "recoveries": int(e.get("recoveries") or 0)}
        s = shm_of(dev)
        return dev, about, snapshot(s) if s is not None else None, _rules(s)
    except (ValueError, TypeError, AttributeError, OSError, UblkError):
        return None


def _cumulative(hist: list[int]) -> list[tuple[str, int]]:
    """(le in seconds, IOs below it) at each bound: a bucket counts once its top is within."""
    out, total, i = [], 0, 0
    for bound in BOUNDS_NS:
        while i < len(hist) and (lib.us_hist_low(i + 1) if i + 1 < len(hist) else 1 << 62) <= bound:
            total += hist[i]
            i += 1
        out.append((repr(bound / 1e9), total))
    return out


def _rules(s: Shm | None) -> list[dict]:
    if s is None:
        return []
    from ..faults.table import read_shm

    try:
        return read_shm(s)["rules"]
    except UblkError:  # a file changing its layout under us: its rules are missing this once
        return []
